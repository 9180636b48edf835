//! The dashboard: server-rendered pages over the job store (minijinja
//! templates compiled into the binary, a little plain JavaScript, no build
//! step). `/` lists jobs; `/jobs/{id}` shows one, following its log live.

use std::collections::HashMap;
use std::sync::OnceLock;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use minijinja::{context, Environment};
use serde_json::{json, Value};

use super::Api;
use crate::store::{Job, JobQuery, JobState};

fn templates() -> &'static Environment<'static> {
    static ENV: OnceLock<Environment<'static>> = OnceLock::new();
    ENV.get_or_init(|| {
        let mut env = Environment::new();
        for (name, source) in [
            ("jobs.html", include_str!("templates/jobs.html")),
            ("job.html", include_str!("templates/job.html")),
            ("style.css", include_str!("templates/style.css")),
        ] {
            // The templates ship in the binary and are tested; a failure
            // here is a build defect, reported on every page.
            if let Err(e) = env.add_template(name, source) {
                tracing::error!(template = name, error = %e, "Dashboard template does not compile.");
            }
        }
        env
    })
}

fn render(name: &str, ctx: minijinja::Value) -> Response {
    match templates().get_template(name).and_then(|t| t.render(ctx)) {
        Ok(html) => Html(html).into_response(),
        Err(e) => {
            tracing::error!(template = name, error = %e, "Dashboard page failed to render.");
            (StatusCode::INTERNAL_SERVER_ERROR, "the page failed to render; see the daemon log").into_response()
        }
    }
}

/// A job as the pages show it: the API's fields plus a readable duration.
fn view(job: &Job) -> Value {
    let mut v = serde_json::to_value(job).unwrap_or(Value::Null);
    if let (Some(a), Some(b)) = (job.started_at, job.finished_at) {
        let secs = (b - a).num_seconds().max(0) as u64;
        v["duration"] = json!(crate::config::format_duration(std::time::Duration::from_secs(secs)));
    }
    v
}

pub(crate) async fn jobs_page(State(s): State<Api>, Query(q): Query<HashMap<String, String>>) -> Response {
    let state = q.get("state").and_then(|st| JobState::parse(st));
    let query = JobQuery {
        state,
        trigger: q.get("trigger").cloned(),
        repo: q.get("repo").cloned(),
        limit: 200,
        ..Default::default()
    };
    let jobs = match s.store.list_jobs(&query).await {
        Ok(jobs) => jobs,
        _ => return (StatusCode::INTERNAL_SERVER_ERROR, "the jobs could not be read").into_response(),
    };
    let jobs = as_tree(jobs.iter().map(view).collect());
    let paused = s.engine.space().why_paused();
    // This replica's environment caches (each replica fills its own).
    let caches = crate::cache::Caches::new(&s.engine.config().storage.path);
    let caches: Vec<Value> = tokio::task::spawn_blocking(move || caches.list())
        .await
        .unwrap_or_default()
        .into_iter()
        .map(|m| {
            let used = chrono::DateTime::from_timestamp(m.last_used as i64, 0).map(|t| t.to_rfc3339());
            serde_json::json!({
                "key": m.key, "repo": m.repo, "environment": m.environment,
                "size": crate::cache::human(m.bytes), "last_used": used,
            })
        })
        .collect();
    let held_for = s.engine.config().limits.held_for;
    let held: Vec<Value> = s
        .store
        .held_all()
        .await
        .unwrap_or_default()
        .into_iter()
        .flat_map(|(subject, list)| list.into_iter().map(move |h| (subject.clone(), h)))
        .map(|(subject, h)| {
            let expires = h.held_at + chrono::Duration::from_std(held_for).unwrap_or_default();
            serde_json::json!({
                "subject": subject, "trigger": h.spec.trigger, "event": h.spec.event,
                "held_at": h.held_at.to_rfc3339(), "expires_at": expires.format("%Y-%m-%d %H:%M UTC").to_string(),
            })
        })
        .collect();
    let held_for = crate::config::format_duration(held_for);
    render("jobs.html", context! { jobs, state => state.map(|s| s.as_str()), paused, caches, held, held_for })
}

pub(crate) async fn job_page(State(s): State<Api>, Path(id): Path<String>) -> Response {
    match s.store.job(&id).await {
        Ok(Some(job)) => {
            let usage = job.usage.as_ref().map(crate::publish::body::usage_line);
            // Only a job that may delegate has children: no other page pays
            // for the search.
            let mut children = Vec::new();
            if !job.spec.delegate.is_empty() {
                let query = JobQuery { parent: Some(job.id.clone()), limit: 200, ..Default::default() };
                children = s.store.list_jobs(&query).await.unwrap_or_default();
            }
            children.reverse();
            let children: Vec<Value> = children.iter().map(view).collect();
            render("job.html", context! { job => view(&job), usage, children })
        }
        Ok(None) => (StatusCode::NOT_FOUND, Html(format!("<p>No job {}.</p>", html_escape(&id)))).into_response(),
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "the job could not be read").into_response(),
    }
}

/// The page's jobs with each child right under its parent (newest first
/// among siblings), and its `depth` below the nearest parent on the page.
fn as_tree(jobs: Vec<Value>) -> Vec<Value> {
    let ids: std::collections::HashSet<String> =
        jobs.iter().filter_map(|j| j["id"].as_str().map(str::to_string)).collect();
    let mut children: HashMap<String, Vec<Value>> = HashMap::new();
    let mut roots = Vec::new();
    for j in jobs {
        match j["parent"].as_str().filter(|p| ids.contains(*p)) {
            Some(p) => children.entry(p.to_string()).or_default().push(j),
            None => roots.push(j),
        }
    }
    fn place(mut j: Value, depth: u64, children: &mut HashMap<String, Vec<Value>>, out: &mut Vec<Value>) {
        let id = j["id"].as_str().unwrap_or_default().to_string();
        j["depth"] = json!(depth);
        out.push(j);
        for c in children.remove(&id).unwrap_or_default() {
            place(c, depth + 1, children, out);
        }
    }
    let mut out = Vec::new();
    for j in roots {
        place(j, 0, &mut children, &mut out);
    }
    out
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_compile() {
        for (name, source) in
            [("jobs.html", include_str!("templates/jobs.html")), ("job.html", include_str!("templates/job.html"))]
        {
            let mut env = Environment::new();
            env.add_template("style.css", "").unwrap();
            if let Err(e) = env.add_template(name, source) {
                panic!("{name}: {e:#}");
            }
        }
    }

    #[test]
    fn children_are_listed_under_their_parent() {
        let jobs = vec![
            json!({"id": "c2", "parent": "p"}),
            json!({"id": "g", "parent": "c1"}),
            json!({"id": "c1", "parent": "p"}),
            json!({"id": "other"}),
            json!({"id": "p"}),
            json!({"id": "orphan", "parent": "gone"}),
        ];
        let tree: Vec<(String, u64)> = as_tree(jobs)
            .iter()
            .map(|j| (j["id"].as_str().unwrap().to_string(), j["depth"].as_u64().unwrap()))
            .collect();
        let want = [("other", 0), ("p", 0), ("c2", 1), ("c1", 1), ("g", 2), ("orphan", 0)];
        assert_eq!(tree, want.map(|(i, d)| (i.to_string(), d)).to_vec());
    }

    #[test]
    fn templates_compile_and_render_an_empty_list() {
        let html =
            templates().get_template("jobs.html").unwrap().render(context! { jobs => Vec::<Value>::new() }).unwrap();
        assert!(html.contains("No jobs yet"));
        assert!(html.contains(".state.failed"), "the stylesheet is inlined");
    }
}
