//! The raw spawn rate of a command: COUNT runs, PARALLEL at a time, through
//! tokio as baton spawns agents. Prints runs per second.
//!
//! usage: spawn COUNT PARALLEL COMMAND

use std::time::Instant;

#[tokio::main]
async fn main() {
    let a: Vec<String> = std::env::args().skip(1).collect();
    let count: usize = a[0].parse().expect("count");
    let parallel: usize = a[1].parse().expect("parallel");
    let command = a[2].clone();
    let start = Instant::now();
    let per = count / parallel;
    let mut tasks = Vec::new();
    for _ in 0..parallel {
        let command = command.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..per {
                tokio::process::Command::new(&command).status().await.expect("spawn");
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    println!("{:.1}", (per * parallel) as f64 / start.elapsed().as_secs_f64());
}
