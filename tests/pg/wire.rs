//! What admission costs PostgreSQL, read off the wire: a proxy between the
//! store and the database reads every message the store sends, so a test
//! can count statements, parses and round trips per batch of deliveries.

use std::path::Path;
use std::sync::{Arc, Mutex};

use baton::rules::{JobSpec, OutputKind};
use baton::store::{Accepted, Delivery, Location, Store};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

/// One message a client sent on connection `conn`: its type byte (`Q` a
/// simple query, `P` a parse, `E` an execute, `S` a sync…) and, for `Q` and
/// `P`, its SQL.
#[derive(Clone, Debug)]
struct Sent {
    conn: usize,
    kind: u8,
    sql: String,
}

/// A TCP proxy in front of the test database that records what clients send.
#[derive(Clone, Default)]
struct Wire {
    /// Everything sent, and how much of it `take` has handed out.
    sent: Arc<Mutex<(Vec<Sent>, usize)>>,
}

impl Wire {
    /// Listens on loopback; returns the URL that reaches the test database
    /// through it (without TLS, so the messages can be read).
    async fn start() -> (Wire, String) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let url = crate::harness::database_url();
        let upstream = database_addr(&url);
        let wire = Wire::default();
        let (w, addr) = (wire.clone(), upstream.clone());
        tokio::spawn(async move {
            let mut conns = 0;
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(&addr).await else { continue };
                conns += 1;
                tokio::spawn(w.clone().relay(conns, client, server));
            }
        });
        let through = url.replacen(&upstream, &format!("127.0.0.1:{port}"), 1);
        let sep = if through.contains('?') { '&' } else { '?' };
        (wire, format!("{through}{sep}sslmode=disable"))
    }

    async fn relay(self, conn: usize, client: TcpStream, server: TcpStream) {
        let (mut client_rx, mut client_tx) = client.into_split();
        let (mut server_rx, mut server_tx) = server.into_split();
        tokio::spawn(async move {
            let _ = tokio::io::copy(&mut server_rx, &mut client_tx).await;
        });
        // The startup message has no type byte: a length, then the rest.
        let Ok(len) = client_rx.read_u32().await else { return };
        let mut rest = vec![0; (len as usize).saturating_sub(4)];
        if client_rx.read_exact(&mut rest).await.is_err() {
            return;
        }
        let _ = server_tx.write_u32(len).await;
        let _ = server_tx.write_all(&rest).await;
        loop {
            let Ok(kind) = client_rx.read_u8().await else { return };
            let Ok(len) = client_rx.read_u32().await else { return };
            let mut body = vec![0; (len as usize).saturating_sub(4)];
            if client_rx.read_exact(&mut body).await.is_err() {
                return;
            }
            let sql = match kind {
                b'Q' => cstr(&body, 0),
                // A parse: the statement's name, then its text.
                b'P' => cstr(&body, body.iter().position(|b| *b == 0).map_or(body.len(), |n| n + 1)),
                _ => String::new(),
            };
            self.sent.lock().unwrap().0.push(Sent { conn, kind, sql });
            let mut frame = vec![kind];
            frame.extend_from_slice(&len.to_be_bytes());
            frame.extend_from_slice(&body);
            if server_tx.write_all(&frame).await.is_err() {
                return;
            }
        }
    }

    /// What was sent since the last call.
    fn take(&self) -> Vec<Sent> {
        let mut sent = self.sent.lock().unwrap();
        let (all, taken) = &mut *sent;
        let from = std::mem::replace(taken, all.len());
        all[from..].to_vec()
    }

    /// Everything sent.
    fn all(&self) -> Vec<Sent> {
        self.sent.lock().unwrap().0.clone()
    }
}

fn cstr(body: &[u8], from: usize) -> String {
    let text = body.get(from..).unwrap_or_default();
    let end = text.iter().position(|b| *b == 0).unwrap_or(text.len());
    String::from_utf8_lossy(&text[..end]).into_owned()
}

/// host:port of the database `url` names.
fn database_addr(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let host = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
    host.split(['/', '?']).next().unwrap_or("127.0.0.1:5432").to_string()
}

fn spec() -> JobSpec {
    JobSpec {
        trigger: "t".into(),
        event: "issues.opened".into(),
        repo: Some("a/b".into()),
        agent: "codex".into(),
        prompt: "p".into(),
        max_attempts: 1,
        output: OutputKind::None,
        ..JobSpec::default()
    }
}

/// Stores `n` deliveries, each with one job, sent at once: on this test's
/// single-threaded runtime every one is queued before the batch writer
/// runs, so they meet it as one batch.
async fn admit_at_once(store: &Store, prefix: &str, n: usize, spec: &JobSpec) {
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let (store, spec) = (store.clone(), spec.clone());
            let delivery = Delivery::new(format!("{prefix}-{i}"), "github", "issues.opened");
            tokio::spawn(async move { store.accept(delivery, vec![spec]).await })
        })
        .collect();
    for t in tasks {
        assert!(matches!(t.await.unwrap(), Ok(Accepted::New(_))));
    }
}

/// Round trips that run statements: a simple query, or a sync after an
/// execute. (A sync alone is sqlx testing a connection, as it does when the
/// pool hands one out and when it takes one back.)
fn round_trips(sent: &[Sent]) -> usize {
    let mut trips = 0;
    let mut executed = std::collections::HashSet::new();
    for s in sent {
        match s.kind {
            b'Q' => trips += 1,
            b'E' => {
                executed.insert(s.conn);
            }
            b'S' if executed.remove(&s.conn) => trips += 1,
            _ => {}
        }
    }
    trips
}

fn count(sent: &[Sent], kind: u8) -> usize {
    sent.iter().filter(|s| s.kind == kind).count()
}

fn queries(sent: &[Sent], sql: &str) -> usize {
    sent.iter().filter(|s| s.kind == b'Q' && s.sql.trim().eq_ignore_ascii_case(sql)).count()
}

/// A batch of deliveries costs PostgreSQL two round trips and two
/// statements, whatever its size: one reads what is stored already, one
/// writes every row as arrays (`INSERT … SELECT FROM unnest`, a part per
/// table), and commits by itself. A connection parses a statement once,
/// then runs it from its cache. A batch whose decisions lock rows (here a
/// concurrency group's) is one transaction.
#[tokio::test]
async fn a_batch_of_deliveries_is_two_statements_whatever_its_size() {
    let (wire, url) = Wire::start().await;
    let mut bytes = [0u8; 6];
    getrandom::fill(&mut bytes).unwrap();
    let schema = format!("w_{}", hex::encode(bytes));
    let location = Location::Postgres { url, schema: Some(schema.clone()), replica: "wire".into() };
    let store = Store::connect(&location, Path::new("/nonexistent")).await.unwrap_or_else(|e| panic!("{e}"));
    let plain = spec();

    for round in 0..8 {
        admit_at_once(&store, &format!("warm{round}"), 4, &plain).await;
    }
    wire.take();
    admit_at_once(&store, "one", 1, &plain).await;
    let one = wire.take();
    admit_at_once(&store, "many", 200, &plain).await;
    let many = wire.take();
    let grouped = JobSpec { concurrency: Some("g".into()), ..plain.clone() };
    admit_at_once(&store, "grouped", 1, &grouped).await;
    let locked = wire.take();

    let rows =
        |sent: &[Sent]| format!("{:#?}", sent.iter().map(|s| (s.conn, s.kind as char, &s.sql)).collect::<Vec<_>>());
    // What is stored already (with the new jobs' numbers), then the
    // deliveries, jobs and queue rows in one statement: no BEGIN, no COMMIT.
    assert_eq!(round_trips(&one), 2, "one delivery: {}", rows(&one));
    assert_eq!(round_trips(&many), 2, "200 deliveries sent at once: {}", rows(&many));
    assert_eq!(count(&many, b'E'), 2, "statements for 200 deliveries: {}", rows(&many));
    assert_eq!(count(&many, b'Q'), 0, "no simple queries (BEGIN, COMMIT): {}", rows(&many));
    assert_eq!((queries(&locked, "BEGIN"), queries(&locked, "COMMIT")), (1, 1), "{}", rows(&locked));
    assert_eq!(store.job_count().await.unwrap(), 8 * 4 + 1 + 200 + 1);
    // Cached: no connection parsed a statement twice.
    let mut parsed = std::collections::HashMap::new();
    for s in wire.all().into_iter().filter(|s| s.kind == b'P') {
        *parsed.entry((s.conn, s.sql)).or_insert(0) += 1;
    }
    let again: Vec<_> = parsed.into_iter().filter(|(_, n)| *n > 1).collect();
    assert!(again.is_empty(), "parsed again on one connection: {again:#?}");

    drop(store);
    crate::replicas::drop_schema(&schema);
}
