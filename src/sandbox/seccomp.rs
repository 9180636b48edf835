//! The one seccomp filter every sandboxed run gets, networked or not,
//! installed by the sandbox's init in the agent's process just before it
//! runs the agent (so the init itself stays free to supervise).
//!
//! It is a deny-list in the spirit of Docker's default profile and Codex's
//! Linux sandbox: the calls in `DENIED` (each with why), sockets of any
//! family but Unix, IPv4, IPv6 and netlink (vsock would reach the
//! hypervisor past the empty network namespace), namespace flags on
//! `clone`, and `personality` beyond the defaults. A refused call is handed
//! to the init (`SECCOMP_RET_USER_NOTIF`), which answers it with `EPERM`
//! (`EAFNOSUPPORT` for a socket family) and names it once in the job's log;
//! should the init not answer, the kernel fails the call with `ENOSYS`, so a
//! missing supervisor never opens anything. In a networked run `connect(2)`
//! goes to the init as well, which only looks (see `watch`).
//!
//! `clone3` gets `ENOSYS` without a note: its flags sit in memory a filter
//! cannot read, and C libraries fall back to `clone`, whose flags it can.

/// `seccomp_data.arch` of the architectures baton filters for.
pub(crate) const AUDIT_ARCH: u32 = if cfg!(target_arch = "x86_64") {
    0xc000_003e
} else if cfg!(target_arch = "aarch64") {
    0xc000_00b7
} else {
    0
};

/// Whether this build can filter (a known architecture).
pub fn supported() -> bool {
    AUDIT_ARCH != 0
}

/// The calls an agent never makes, and why.
pub(crate) const DENIED: &[(libc::c_long, &str, &str)] = &[
    (libc::SYS_ptrace, "ptrace", "reading or steering another process: the sandbox's init, the agent's parent"),
    (libc::SYS_process_vm_readv, "process_vm_readv", "reading another process's memory"),
    (libc::SYS_process_vm_writev, "process_vm_writev", "writing another process's memory"),
    (libc::SYS_kcmp, "kcmp", "probing other processes' kernel objects"),
    (libc::SYS_keyctl, "keyctl", "kernel keyrings hold keys of the host's other sessions"),
    (libc::SYS_add_key, "add_key", "a key would outlive the job in a keyring"),
    (libc::SYS_request_key, "request_key", "kernel keyrings, and it can run a host helper"),
    (libc::SYS_bpf, "bpf", "loading programs into the kernel"),
    (libc::SYS_perf_event_open, "perf_event_open", "kernel and CPU side channels"),
    (libc::SYS_userfaultfd, "userfaultfd", "stalls kernel code at will, a classic exploit primitive"),
    (libc::SYS_io_uring_setup, "io_uring_setup", "its connects pass around the connect watch; large attack surface"),
    (libc::SYS_io_uring_enter, "io_uring_enter", "as io_uring_setup"),
    (libc::SYS_io_uring_register, "io_uring_register", "as io_uring_setup"),
    (libc::SYS_kexec_load, "kexec_load", "booting another kernel"),
    (libc::SYS_kexec_file_load, "kexec_file_load", "booting another kernel"),
    (libc::SYS_init_module, "init_module", "loading kernel modules"),
    (libc::SYS_finit_module, "finit_module", "loading kernel modules"),
    (libc::SYS_delete_module, "delete_module", "unloading kernel modules"),
    (libc::SYS_mount, "mount", "changing what the sandbox shows"),
    (libc::SYS_umount2, "umount2", "uncovering what the sandbox masks"),
    (libc::SYS_pivot_root, "pivot_root", "changing the sandbox's root"),
    (libc::SYS_fsopen, "fsopen", "the new mount API: as mount"),
    (libc::SYS_fsconfig, "fsconfig", "as fsopen"),
    (libc::SYS_fsmount, "fsmount", "as fsopen"),
    (libc::SYS_fspick, "fspick", "as fsopen"),
    (libc::SYS_move_mount, "move_mount", "as fsopen"),
    (libc::SYS_open_tree, "open_tree", "as fsopen"),
    (libc::SYS_mount_setattr, "mount_setattr", "as fsopen"),
    (libc::SYS_unshare, "unshare", "new namespaces: a user namespace brings capabilities back"),
    (libc::SYS_setns, "setns", "entering other namespaces"),
    (libc::SYS_name_to_handle_at, "name_to_handle_at", "file handles name files past the paths the sandbox shows"),
    (libc::SYS_open_by_handle_at, "open_by_handle_at", "opens files past the paths the sandbox shows"),
    (libc::SYS_acct, "acct", "process accounting of the host"),
    (libc::SYS_swapon, "swapon", "the host's swap"),
    (libc::SYS_swapoff, "swapoff", "the host's swap"),
    (libc::SYS_reboot, "reboot", "the host's power"),
    (libc::SYS_syslog, "syslog", "the kernel's log: host addresses and other tenants' events"),
    (libc::SYS_quotactl, "quotactl", "the host's disk quotas"),
    (libc::SYS_vhangup, "vhangup", "hanging up the host's terminals"),
    #[cfg(target_arch = "x86_64")]
    (libc::SYS_iopl, "iopl", "raw I/O ports"),
    #[cfg(target_arch = "x86_64")]
    (libc::SYS_ioperm, "ioperm", "raw I/O ports"),
    #[cfg(target_arch = "x86_64")]
    (libc::SYS_uselib, "uselib", "an obsolete loader call with a history of bugs"),
];

/// Socket families an agent may open: Unix, IPv4, IPv6 (which the empty
/// network namespace and the proxy govern), and netlink for the route
/// queries some tools make. Everything else (vsock, packet, Bluetooth, …)
/// fails with `EAFNOSUPPORT`, as in Flatpak.
pub(crate) const SOCKET_FAMILIES: &[i32] = &[libc::AF_UNIX, libc::AF_INET, libc::AF_INET6, libc::AF_NETLINK];

/// `personality` values allowed: Linux, 32-bit Linux, and the query.
const PERSONALITIES: &[u32] = &[0, 0x0008, 0xffff_ffff];

/// `clone` flags that make namespaces.
const NAMESPACE_FLAGS: u32 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWCGROUP
    | 0x80/* CLONE_NEWTIME */) as u32;

/// x32 system calls on x86_64 carry this bit: another table, refused whole.
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

/// How the init answers a call the filter handed to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// A connect in a networked run: counted if it bypasses the proxy, then
    /// left to the kernel (which refuses it: there is no route).
    Watch,
    /// Refused with this errno; the text names the call for the job's log.
    Refuse { errno: i32, what: String },
}

/// What the init answers for call `nr` with first argument `arg0`.
pub fn answer(nr: i64, arg0: u64) -> Answer {
    if nr == libc::SYS_connect {
        return Answer::Watch;
    }
    if nr == libc::SYS_socket {
        let family = arg0 as u32 as i32;
        return Answer::Refuse { errno: libc::EAFNOSUPPORT, what: format!("socket({})", family_name(family)) };
    }
    let what = match nr {
        n if n == libc::SYS_clone => format!("clone with namespace flags {:#x}", arg0 as u32 & NAMESPACE_FLAGS),
        n if n == libc::SYS_personality => format!("personality({:#x})", arg0 as u32),
        n => DENIED.iter().find(|(d, _, _)| *d == n).map(|(_, name, _)| name.to_string()).unwrap_or(format!("#{n}")),
    };
    Answer::Refuse { errno: libc::EPERM, what }
}

fn family_name(family: i32) -> String {
    let name = match family {
        libc::AF_VSOCK => "AF_VSOCK",
        libc::AF_PACKET => "AF_PACKET",
        libc::AF_BLUETOOTH => "AF_BLUETOOTH",
        libc::AF_ALG => "AF_ALG",
        libc::AF_KEY => "AF_KEY",
        libc::AF_XDP => "AF_XDP",
        libc::AF_CAN => "AF_CAN",
        libc::AF_TIPC => "AF_TIPC",
        libc::AF_RDS => "AF_RDS",
        libc::AF_APPLETALK => "AF_APPLETALK",
        libc::AF_X25 => "AF_X25",
        libc::AF_AX25 => "AF_AX25",
        libc::AF_NETROM => "AF_NETROM",
        libc::AF_PPPOX => "AF_PPPOX",
        libc::AF_LLC => "AF_LLC",
        libc::AF_IB => "AF_IB",
        libc::AF_MPLS => "AF_MPLS",
        _ => return format!("family {family}"),
    };
    name.to_string()
}

/// A BPF program under construction: jumps name labels, resolved at the end.
#[derive(Default)]
struct Asm {
    code: Vec<(u16, Jump, Jump, u32)>,
    labels: Vec<(&'static str, usize)>,
}

#[derive(Clone, Copy)]
enum Jump {
    Next,
    To(&'static str),
}

const LD_W_ABS: u16 = 0x20;
const JEQ_K: u16 = 0x15;
const JGE_K: u16 = 0x35;
const JSET_K: u16 = 0x45;
const RET_K: u16 = 0x06;

/// Offsets into `struct seccomp_data`.
const NR: u32 = 0;
const ARCH: u32 = 4;
/// The low 32 bits of the first argument (little-endian machines only:
/// both supported architectures are).
const ARG0_LOW: u32 = 16;

impl Asm {
    fn op(&mut self, code: u16, jt: Jump, jf: Jump, k: u32) {
        self.code.push((code, jt, jf, k));
    }
    fn load(&mut self, offset: u32) {
        self.op(LD_W_ABS, Jump::Next, Jump::Next, offset);
    }
    fn if_eq(&mut self, k: u32, to: &'static str) {
        self.op(JEQ_K, Jump::To(to), Jump::Next, k);
    }
    fn ret(&mut self, k: u32) {
        self.op(RET_K, Jump::Next, Jump::Next, k);
    }
    fn label(&mut self, name: &'static str) {
        self.labels.push((name, self.code.len()));
    }

    fn finish(self) -> Vec<libc::sock_filter> {
        let at = |name: &str| self.labels.iter().find(|(n, _)| *n == name).map(|(_, i)| *i);
        let mut out = Vec::with_capacity(self.code.len());
        for (i, (code, jt, jf, k)) in self.code.iter().enumerate() {
            let offset = |j: &Jump| -> u8 {
                match j {
                    Jump::Next => 0,
                    Jump::To(name) => {
                        let target = at(name).unwrap_or_else(|| panic!("seccomp: no label {name}"));
                        u8::try_from(target - i - 1).unwrap_or_else(|_| panic!("seccomp: jump to {name} too far"))
                    }
                }
            };
            out.push(libc::sock_filter { code: *code, jt: offset(jt), jf: offset(jf), k: *k });
        }
        out
    }
}

/// The filter for a run; `watch_connect`: hand `connect(2)` to the init too
/// (networked runs, whose direct connections are counted).
pub fn filter(watch_connect: bool) -> Vec<libc::sock_filter> {
    let mut a = Asm::default();
    a.load(ARCH);
    a.op(JEQ_K, Jump::Next, Jump::To("kill"), AUDIT_ARCH);
    a.load(NR);
    if cfg!(target_arch = "x86_64") {
        a.op(JGE_K, Jump::To("enosys"), Jump::Next, X32_SYSCALL_BIT);
    }
    for (nr, _, _) in DENIED {
        a.if_eq(*nr as u32, "notify");
    }
    a.if_eq(libc::SYS_socket as u32, "socket");
    a.if_eq(libc::SYS_personality as u32, "personality");
    a.if_eq(libc::SYS_clone as u32, "clone");
    a.if_eq(libc::SYS_clone3 as u32, "enosys");
    if watch_connect {
        a.if_eq(libc::SYS_connect as u32, "notify");
    }
    a.ret(libc::SECCOMP_RET_ALLOW);

    a.label("socket");
    a.load(ARG0_LOW);
    for family in SOCKET_FAMILIES {
        a.if_eq(*family as u32, "allow");
    }
    a.ret(libc::SECCOMP_RET_USER_NOTIF);

    a.label("personality");
    a.load(ARG0_LOW);
    for p in PERSONALITIES {
        a.if_eq(*p, "allow");
    }
    a.ret(libc::SECCOMP_RET_USER_NOTIF);

    a.label("clone");
    a.load(ARG0_LOW);
    a.op(JSET_K, Jump::To("notify"), Jump::Next, NAMESPACE_FLAGS);
    a.ret(libc::SECCOMP_RET_ALLOW);

    a.label("allow");
    a.ret(libc::SECCOMP_RET_ALLOW);
    a.label("notify");
    a.ret(libc::SECCOMP_RET_USER_NOTIF);
    a.label("enosys");
    a.ret(libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32);
    a.label("kill");
    a.ret(libc::SECCOMP_RET_KILL_PROCESS);
    a.finish()
}

/// In the child, between fork and exec: installs `filter` with a listener
/// and sends the listener to the init over `to_init`. Only
/// async-signal-safe calls.
///
/// # Safety
/// To be called only in a freshly forked child, before exec.
pub unsafe fn install(filter: &[libc::sock_filter], to_init: i32) -> std::io::Result<()> {
    let prog = libc::sock_fprog { len: filter.len() as u16, filter: filter.as_ptr() as *mut libc::sock_filter };
    if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let listener = libc::syscall(
        libc::SYS_seccomp,
        libc::SECCOMP_SET_MODE_FILTER,
        libc::SECCOMP_FILTER_FLAG_NEW_LISTENER,
        &prog as *const libc::sock_fprog,
    ) as i32;
    if listener < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let sent = super::watch::send_fd(to_init, listener);
    libc::close(listener);
    sent
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the program over one call, as the kernel would.
    fn run(prog: &[libc::sock_filter], arch: u32, nr: u32, arg0: u64) -> u32 {
        let mut data = [0u8; 64];
        data[0..4].copy_from_slice(&nr.to_le_bytes());
        data[4..8].copy_from_slice(&arch.to_le_bytes());
        data[16..24].copy_from_slice(&arg0.to_le_bytes());
        let (mut pc, mut acc) = (0usize, 0u32);
        loop {
            let i = prog[pc];
            match i.code {
                LD_W_ABS => {
                    let k = i.k as usize;
                    acc = u32::from_le_bytes(data[k..k + 4].try_into().unwrap());
                    pc += 1;
                }
                JEQ_K | JGE_K | JSET_K => {
                    let taken = match i.code {
                        JEQ_K => acc == i.k,
                        JGE_K => acc >= i.k,
                        _ => acc & i.k != 0,
                    };
                    pc += 1 + if taken { i.jt } else { i.jf } as usize;
                }
                RET_K => return i.k,
                other => panic!("unexpected opcode {other:#x}"),
            }
        }
    }

    fn check(watch: bool, nr: libc::c_long, arg0: u64, expect: u32) {
        let prog = filter(watch);
        assert_eq!(run(&prog, AUDIT_ARCH, nr as u32, arg0), expect, "call {nr} arg0 {arg0:#x}, watch {watch}");
    }

    const NOTIFY: u32 = libc::SECCOMP_RET_USER_NOTIF;
    const ALLOW: u32 = libc::SECCOMP_RET_ALLOW;

    #[test]
    fn the_filter_refuses_what_the_table_says_and_allows_the_rest() {
        for (nr, name, _) in DENIED {
            check(false, *nr, 0, NOTIFY);
            assert_eq!(answer(*nr, 0), Answer::Refuse { errno: libc::EPERM, what: name.to_string() });
        }
        for nr in [libc::SYS_read, libc::SYS_write, libc::SYS_execve, libc::SYS_openat, libc::SYS_wait4] {
            check(false, nr, 0, ALLOW);
        }
        check(false, libc::SYS_connect, 0, ALLOW);
        check(true, libc::SYS_connect, 0, NOTIFY);
        assert_eq!(answer(libc::SYS_connect, 0), Answer::Watch);
        check(false, libc::SYS_clone3, 0, libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32);
        // Another architecture's table (i386 through int 0x80) is never read.
        let prog = filter(false);
        assert_eq!(run(&prog, 0x4000_0003, libc::SYS_read as u32, 0), libc::SECCOMP_RET_KILL_PROCESS);
    }

    #[test]
    fn sockets_of_other_families_are_refused_with_eafnosupport() {
        for family in SOCKET_FAMILIES {
            check(true, libc::SYS_socket, *family as u64, ALLOW);
        }
        for family in [libc::AF_VSOCK, libc::AF_PACKET, libc::AF_BLUETOOTH, libc::AF_ALG] {
            check(false, libc::SYS_socket, family as u64, NOTIFY);
        }
        assert_eq!(
            answer(libc::SYS_socket, libc::AF_VSOCK as u64),
            Answer::Refuse { errno: libc::EAFNOSUPPORT, what: "socket(AF_VSOCK)".into() }
        );
    }

    #[test]
    fn clone_may_fork_and_thread_but_not_make_namespaces() {
        let thread =
            (libc::CLONE_VM | libc::CLONE_FS | libc::CLONE_FILES | libc::CLONE_SIGHAND | libc::CLONE_THREAD) as u64;
        check(false, libc::SYS_clone, thread, ALLOW);
        check(false, libc::SYS_clone, libc::SIGCHLD as u64, ALLOW);
        check(false, libc::SYS_clone, (libc::CLONE_NEWUSER | libc::SIGCHLD) as u64, NOTIFY);
        check(false, libc::SYS_clone, libc::CLONE_NEWNET as u64, NOTIFY);
    }

    #[test]
    fn personality_keeps_only_the_defaults() {
        for p in [0u64, 8, 0xffff_ffff] {
            check(false, libc::SYS_personality, p, ALLOW);
        }
        // ADDR_NO_RANDOMIZE, READ_IMPLIES_EXEC
        check(false, libc::SYS_personality, 0x0040000, NOTIFY);
        check(false, libc::SYS_personality, 0x0400000, NOTIFY);
    }
}
