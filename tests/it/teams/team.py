#!/usr/bin/env python3
"""A member of an agent team in baton's tests: it speaks MCP to baton's
/mcp with the token of its run ($BATON_MCP_URL, $BATON_MCP_TOKEN), as a CLI
would, and tries what an agent should not be able to do.

    team.py boss LOOT            delegate two subtasks, wait for both, try the
                                 forbidden things (the prompt names a job
                                 that is not its child); leave the token in LOOT
    team.py sleeper LOOT         delegate a sleeping child, leave the token in
                                 LOOT, and wait to be cancelled
    team.py spender              fan out two children, then delegate one
                                 after another until the team's budget refuses
    team.py probe                do the task in the prompt (stdin)
"""
import json
import os
import socket
import sys
import time
import urllib.error
import urllib.request

URL = os.environ.get("BATON_MCP_URL", "")
TOKEN = os.environ.get("BATON_MCP_TOKEN", "")
# Straight to the proxy's address, or as a proxied request ($HTTP_PROXY):
# both reach baton's /mcp.
DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))
PROXIED = urllib.request.build_opener()


class Mcp:
    def __init__(self, opener, token=TOKEN):
        self.opener, self.token, self.session, self.n = opener, token, None, 0
        init = self.rpc("initialize", {"protocolVersion": "2025-06-18", "capabilities": {},
                                       "clientInfo": {"name": "team", "version": "1"}})
        if "result" not in init:
            raise SystemExit(f"initialize: {init}")
        self.post({"jsonrpc": "2.0", "method": "notifications/initialized"})

    def post(self, msg, url=None):
        req = urllib.request.Request(url or URL, data=json.dumps(msg).encode(), method="POST")
        req.add_header("content-type", "application/json")
        req.add_header("accept", "application/json, text/event-stream")
        req.add_header("mcp-protocol-version", "2025-06-18")
        if self.token:
            req.add_header("authorization", "Bearer " + self.token)
        if self.session:
            req.add_header("mcp-session-id", self.session)
        try:
            with self.opener.open(req, timeout=300) as r:
                self.session = r.headers.get("mcp-session-id") or self.session
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def rpc(self, method, params):
        self.n += 1
        status, text = self.post({"jsonrpc": "2.0", "id": self.n, "method": method, "params": params})
        for line in reversed(text.splitlines()):
            if line.startswith("data:"):
                try:
                    m = json.loads(line[5:])
                except ValueError:
                    continue
                if "id" in m:
                    return m
        try:
            return json.loads(text)
        except ValueError:
            return {"error": f"HTTP {status}: {text}"}

    def call(self, tool, args):
        """(refused, text) of one tool call."""
        m = self.rpc("tools/call", {"name": tool, "arguments": args})
        if "error" in m:
            return True, json.dumps(m["error"])
        r = m.get("result") or {}
        return bool(r.get("isError")), "".join(c.get("text", "") for c in r.get("content", []))


def via_tunnel():
    """`initialize` through a CONNECT tunnel to the proxy itself, as a client
    that tunnels everything does: the status line of the answer."""
    s = socket.create_connection(("127.0.0.1", 3128), timeout=30)
    s.sendall(b"CONNECT 127.0.0.1:3128 HTTP/1.1\r\nHost: 127.0.0.1:3128\r\n\r\n")
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(1)
    body = json.dumps({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}).encode()
    s.sendall(b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1:3128\r\nContent-Type: application/json\r\n"
              b"Accept: application/json, text/event-stream\r\nAuthorization: Bearer " + TOKEN.encode() +
              b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    answer = s.recv(200).decode(errors="replace")
    s.close()
    return head.split(b"\r\n")[0].decode() + " / " + answer.split("\r\n")[0]


def expect_refused(mcp, what, tool, args):
    refused, text = mcp.call(tool, args)
    print(("REFUSED" if refused else "ALLOWED") + f" {what}: {text}", flush=True)


def ids_of(text):
    return [j["id"] for j in json.loads(text)["jobs"]]


def leave(loot, name, text):
    """Leaves `text` in LOOT whole: the test waits for the file to exist,
    and must never read it half-written."""
    part = os.path.join(loot, name + ".part")
    with open(part, "w") as f:
        f.write(text)
    os.replace(part, os.path.join(loot, name))


def boss(loot):
    outsider = sys.stdin.read().strip()
    leave(loot, "token", TOKEN)
    mcp = Mcp(PROXIED)
    refused, text = mcp.call("delegate", {"agent": "probe", "prompts": ["subtask one", "subtask two: hand on"]})
    if refused:
        raise SystemExit(f"delegate: {text}")
    ids = ids_of(text)
    print("delegated", " ".join(ids), flush=True)
    expect_refused(mcp, "an agent not in delegate", "delegate", {"agent": "other", "prompt": "x"})
    expect_refused(mcp, "another repository", "delegate", {"agent": "probe", "repo": "o/else", "prompt": "x"})
    expect_refused(mcp, "a trigger", "run_trigger", {"trigger": "boss"})
    expect_refused(mcp, "the trigger list", "list_triggers", {})
    expect_refused(mcp, "a job not its child", "get_job", {"id": outsider})
    expect_refused(mcp, "cancelling a job not its child", "cancel_job", {"id": outsider})
    refused, text = mcp.call("list_jobs", {})
    listed = sorted(j["id"] for j in json.loads(text)["jobs"]) if not refused else []
    print("lists only its children:", listed == sorted(ids), flush=True)
    # The API itself, past /mcp: the proxy forwards only /mcp.
    status, text = mcp.post({}, url=URL.replace("/mcp", "/api/jobs"))
    print(f"REFUSED the API past /mcp: {status} {text.strip()}" if status >= 400 else "ALLOWED the API past /mcp",
          flush=True)
    if ":3128/" in URL:
        print("tunnel:", via_tunnel(), flush=True)
    refused, text = mcp.call("wait_job", {"ids": ids, "timeout": 120})
    for job in json.loads(text)["ended"]:
        print(f"child {job['id']} {job['state']}: {job['result']}", flush=True)
    # A child that fails is the parent's to see (and to retry or give up on).
    refused, text = mcp.call("delegate", {"agent": "probe", "prompt": "fail"})
    refused, text = mcp.call("wait_job", {"ids": ids_of(text), "timeout": 120})
    for job in json.loads(text)["ended"]:
        print(f"failed child {job['id']} {job['state']}: {job['error']}", flush=True)


def sleeper(loot):
    mcp = Mcp(DIRECT)
    refused, text = mcp.call("delegate", {"agent": "probe", "prompt": "sleep"})
    if refused:
        raise SystemExit(f"delegate: {text}")
    leave(loot, "child", ids_of(text)[0])
    leave(loot, "token", TOKEN)
    time.sleep(120)


def spender():
    mcp = Mcp(DIRECT)
    refused, text = mcp.call("delegate", {"agent": "probe", "prompts": ["spend 0.25 slowly"] * 2})
    if refused:
        raise SystemExit(f"fan-out: {text}")
    ids = ids_of(text)
    mcp.call("wait_job", {"ids": ids, "timeout": 120})
    print("fan-out:", " ".join(ids), flush=True)
    for n in range(2, 4):
        refused, text = mcp.call("delegate", {"agent": "probe", "prompt": "spend 0.5"})
        if refused:
            print(f"delegate {n} refused: {text}", flush=True)
            return
        ids = ids_of(text)
        mcp.call("wait_job", {"ids": ids, "timeout": 120})
        print(f"delegate {n}: {ids[0]}", flush=True)


def probe():
    task = sys.stdin.read().strip()
    if task == "sleep":
        time.sleep(120)
    if task == "fail":
        print("giving up", flush=True)
        sys.exit(3)
    if task.startswith("spend "):
        if task.endswith("slowly"):
            time.sleep(2)
        with open(os.environ["BATON_USAGE_FILE"], "w") as f:
            json.dump({"usage": {"input_tokens": 1, "output_tokens": 1, "cost_usd": float(task.split()[1])}}, f)
    # The workspace is at the same path in every sandbox: a worktree of
    # its own holds this child's mark and no other's.
    mark = "mark-" + "".join(c for c in task if c.isalnum())
    open(mark, "w").close()
    time.sleep(0.5)
    marks = ",".join(sorted(f for f in os.listdir(".") if f.startswith("mark-")))
    print(f"probe did <{task}> in {os.getcwd()} holding {marks}", flush=True)
    if "hand on" in task:
        refused, text = Mcp(DIRECT).call("delegate", {"agent": "probe", "prompt": "deeper still"})
        print(("deeper: refused " if refused else "deeper: allowed ") + text, flush=True)


if __name__ == "__main__":
    role = sys.argv[1]
    if role == "boss":
        boss(sys.argv[2])
    elif role == "sleeper":
        sleeper(sys.argv[2])
    elif role == "spender":
        spender()
    else:
        probe()
