//! Agent invocation against real processes: each way of passing the prompt
//! and of reading the result, the cleared environment, and the output cap.

use std::time::Duration;

use baton::config::{AgentDef, PromptMode, ResultMode};
use baton::engine::agent::{Ending, Invocation};
use tokio_util::sync::CancellationToken;

fn agent(command: &[&str], prompt: PromptMode, result: ResultMode) -> AgentDef {
    AgentDef {
        name: "t".into(),
        command: command.iter().map(|s| s.to_string()).collect(),
        prompt,
        result,
        env: vec![],
        vars: Default::default(),
        timeout: Duration::from_secs(30),
        install: None,
        max_parallel: None,
        sandbox: Default::default(),
        usage: Default::default(),
        model: None,
        cli: None,
    }
}

async fn run(def: &AgentDef, prompt: &str, cap: u64) -> (Ending, Result<String, String>, String) {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let job = dir.path().join("job");
    let log = dir.path().join("log");
    let cancel = CancellationToken::new();
    let inv = Invocation {
        agent: def,
        prompt,
        workdir: &work,
        job_dir: &job,
        log: &log,
        timeout: def.timeout,
        output_cap: cap,
        cancel: &cancel,
        on_spawn: None,
        confine: None,
        budget: None,
        setup: None,
    };
    let r = inv.run().await.expect("agent runs");
    let result = inv.result(&r).await;
    (r.ending, result, std::fs::read_to_string(&log).unwrap_or_default())
}

#[tokio::test]
async fn prompt_on_stdin_result_on_stdout() {
    let def = agent(&["sh", "-c", "tr a-z A-Z"], PromptMode::Stdin, ResultMode::Stdout);
    let (ending, result, _) = run(&def, "hello", 1 << 20).await;
    assert_eq!(ending, Ending::Exited(Some(0)));
    assert_eq!(result.unwrap(), "HELLO");
}

#[tokio::test]
async fn prompt_as_argument_is_one_argv_element() {
    let def = agent(&["sh", "-c", "printf '%s|' \"$@\"", "sh", "{{ prompt }}"], PromptMode::Arg, ResultMode::Stdout);
    let (_, result, _) = run(&def, "two words; $(not run)", 1 << 20).await;
    assert_eq!(result.unwrap(), "two words; $(not run)|");
}

#[tokio::test]
async fn prompt_in_a_file_result_in_a_file() {
    let def = agent(
        &["sh", "-c", "cat \"$1\" | rev > \"$2\"", "sh", "{{ prompt_file }}", "{{ result_file }}"],
        PromptMode::File,
        ResultMode::File,
    );
    let (_, result, _) = run(&def, "abc", 1 << 20).await;
    assert_eq!(result.unwrap(), "cba");
    let missing = agent(&["sh", "-c", "true", "{{ result_file }}"], PromptMode::Stdin, ResultMode::File);
    let (_, result, _) = run(&missing, "x", 1 << 20).await;
    assert_eq!(result.unwrap_err(), "the agent wrote no result file");
}

#[tokio::test]
async fn json_field_result() {
    let def = agent(
        &["sh", "-c", "echo '{\"result\": \"from json\", \"cost\": 1}'"],
        PromptMode::Stdin,
        ResultMode::Json("result".into()),
    );
    let (_, result, _) = run(&def, "", 1 << 20).await;
    assert_eq!(result.unwrap(), "from json");
}

#[tokio::test]
async fn environment_is_cleared_except_path_home_and_listed() {
    // cargo sets both for the test process; only the listed one may pass.
    let mut def = agent(&["sh", "-c", "env | sort"], PromptMode::Stdin, ResultMode::Stdout);
    def.env = vec!["CARGO_PKG_NAME".into()];
    let (_, result, _) = run(&def, "", 1 << 20).await;
    let env = result.unwrap();
    assert!(env.contains("CARGO_PKG_NAME=baton"), "{env}");
    assert!(env.contains("PATH="), "{env}");
    assert!(!env.contains("CARGO_MANIFEST_DIR"), "{env}");
}

#[tokio::test]
async fn output_is_capped_and_the_log_says_where() {
    let def = agent(&["sh", "-c", "head -c 100000 /dev/zero | tr '\\0' x"], PromptMode::Stdin, ResultMode::Stdout);
    let (ending, result, log) = run(&def, "", 1000).await;
    assert_eq!(ending, Ending::Exited(Some(0)));
    assert_eq!(result.unwrap().len(), 1000);
    assert!(log.contains("output cap reached"), "{log}");
    assert!(log.len() < 2000);
}
