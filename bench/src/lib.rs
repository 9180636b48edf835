//! What the benchmark helpers share: opening the store a command line names.

use baton::store::{Durability, Location, Store};

/// The store `args` start with — an embedded store's folder (redb, or the
/// store already there; `sled:FOLDER` for sled), or a PostgreSQL URL and
/// schema — and the arguments after it. `replica` names this process on
/// PostgreSQL.
pub async fn open_store<'a>(args: &'a [String], durability: Durability, replica: &str) -> (Store, &'a [String]) {
    match args {
        [url, schema, rest @ ..] if url.starts_with("postgres://") => {
            let location =
                Location::Postgres { url: url.clone(), schema: Some(schema.clone()), replica: replica.into() };
            (Store::connect(&location, std::path::Path::new(".")).await.expect("connect"), rest)
        }
        [path, rest @ ..] => (open_retrying(std::path::Path::new(path), durability).await, rest),
        [] => panic!("no store named"),
    }
}

/// Opens an embedded store (`sled:FOLDER` for sled), waiting out (up to
/// 10 s) a process that is still letting go of its lock.
pub async fn open_retrying(path: &std::path::Path, durability: Durability) -> Store {
    let text = path.to_string_lossy();
    let (path, location) = match text.strip_prefix("sled:") {
        Some(folder) => {
            let path = std::path::PathBuf::from(folder);
            (path.clone(), Location::Sled { path, durability })
        }
        None => (path.to_path_buf(), Location::Redb { path: path.to_path_buf(), durability }),
    };
    let mut last = None;
    for _ in 0..200 {
        let opened = match &location {
            Location::Sled { .. } => Store::connect(&location, &path).await,
            _ => Store::open_with(&path, durability),
        };
        match opened {
            Ok(store) => return store,
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("open store {}: {:?}", path.display(), last)
}
