//! The wire types of `/api`: what a request may carry and what an answer
//! holds, as serde structs shared by the routes (`api`), the typed
//! [`Client`](super::client::Client) and the tests.
//!
//! Requests deny unknown fields, and [`parse`] turns any mistake into a
//! [`BadField`] naming the field at fault, so `POST /api/jobs` answers 400
//! with that name. A field's own rule (a non-empty string, an issue number,
//! an object) lives in its `deserialize_with` function, which gives the
//! message. What depends on more than one field or on the daemon (a trigger
//! exists, an agent is allowed) stays with the route. Answers serialize to
//! exactly the JSON the routes wrote by hand before these types existed.

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

pub use crate::store::{Job, JobState};

pub use crate::store::Skipped;

/// `POST /api/jobs` from the API token's holder: either a trigger with `on
/// = ["api"]` (`trigger`, `inputs`) or a free-form job (`agent`, `prompt`
/// and where it works and publishes). A `null` field is an absent one.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateJob {
    /// A trigger with `on = ["api"]`.
    #[serde(default, deserialize_with = "text", skip_serializing_if = "Option::is_none")]
    pub trigger: Option<String>,
    /// The trigger's inputs (`{{ inputs.KEY }}` in its templates).
    #[serde(default, deserialize_with = "inputs", skip_serializing_if = "Option::is_none")]
    pub inputs: Option<Map<String, Value>>,
    /// A free-form job's agent (one of `[api] agents`).
    #[serde(default, deserialize_with = "text", skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    /// `owner/name`.
    #[serde(default, deserialize_with = "text", skip_serializing_if = "Option::is_none")]
    pub repo: Option<String>,
    /// none | default-branch | head-sha | pr-head.
    #[serde(default, deserialize_with = "text", skip_serializing_if = "Option::is_none")]
    pub workspace: Option<String>,
    /// The branch (default-branch) or commit (head-sha) to work on.
    #[serde(rename = "ref", default, deserialize_with = "text", skip_serializing_if = "Option::is_none")]
    pub git_ref: Option<String>,
    /// A free-form job's prompt (taken as text, never as a template).
    #[serde(default, deserialize_with = "text", skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    /// Where the result goes, as a trigger's `[output]` table.
    #[serde(default, deserialize_with = "output", skip_serializing_if = "Option::is_none")]
    pub output: Option<Map<String, Value>>,
    /// The issue or pull request the job is about.
    #[serde(default, deserialize_with = "subject", skip_serializing_if = "Option::is_none")]
    pub subject: Option<u64>,
}

/// `POST /api/jobs` from a team job's agent (through `/mcp`): a child of
/// its own job, on its repository, with one of the agents it may delegate to.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateChild {
    #[serde(default, deserialize_with = "text", skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    #[serde(default, deserialize_with = "text", skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    #[serde(default, deserialize_with = "text", skip_serializing_if = "Option::is_none")]
    pub workspace: Option<String>,
    #[serde(rename = "ref", default, deserialize_with = "text", skip_serializing_if = "Option::is_none")]
    pub git_ref: Option<String>,
    /// Only the parent's own repository is accepted.
    #[serde(default, deserialize_with = "text", skip_serializing_if = "Option::is_none")]
    pub repo: Option<String>,
    /// Take this part of what the parent's budget leaves (a fan-out of n
    /// sends n, n-1, … 1, so each child gets an equal share).
    #[serde(default, deserialize_with = "share", skip_serializing_if = "Option::is_none")]
    pub share: Option<u32>,
}

/// What a team's agent is told when it names a trigger: a child is always
/// made from its parent's own agents and repository.
pub(crate) const CHILD_NO_TRIGGER: &str = "a job's agent starts children of its own job, never a trigger";

/// A request field that is wrong, and why: a 400 naming it.
/// Shown as `field: message`, or as the message alone when it names the
/// field itself (`` `repo` is required for … ``).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct BadField {
    /// The field, as the request spelled it (`output.kind` for a nested one).
    pub field: String,
    pub message: String,
}

impl std::fmt::Display for BadField {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.message.starts_with(&format!("`{}` ", self.field)) {
            true => f.write_str(&self.message),
            false => write!(f, "{}: {}", self.field, self.message),
        }
    }
}

impl BadField {
    pub fn new(field: &str, message: impl std::fmt::Display) -> BadField {
        BadField { field: field.to_string(), message: message.to_string() }
    }
}

/// A request body of type `T`: a JSON object whose fields each keep their
/// rule; the first mistake found is named.
pub fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, BadField> {
    let value = object(body)?;
    from_object(value)
}

/// A request body that must be a JSON object, before it is typed (a route
/// may need to see which fields were given at all).
pub fn object(body: &[u8]) -> Result<Map<String, Value>, BadField> {
    match serde_json::from_slice(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(BadField::new("body", "must be a JSON object")),
        Err(e) => Err(BadField::new("body", format!("not JSON: {e}"))),
    }
}

/// `map` as a `T`, the first mistake named by its field.
pub(crate) fn from_object<T: serde::de::DeserializeOwned>(map: Map<String, Value>) -> Result<T, BadField> {
    // From a `Value` rather than the bytes: serde_json then adds no
    // "at line 1 column 40" to the messages our field rules wrote.
    serde_path_to_error::deserialize(Value::Object(map)).map_err(|e| {
        let field = e.path().to_string();
        let message = e.inner().to_string();
        BadField { message: unknown_field(&message).unwrap_or(message), field }
    })
}

/// serde's "unknown field `colour`, expected one of `trigger`, `inputs`"
/// as the API has always said it, with the likely intended name when there
/// is one; `None` for any other message.
fn unknown_field(message: &str) -> Option<String> {
    let rest = message.strip_prefix("unknown field `")?;
    let (word, expected) = rest.split_once('`')?;
    let fields: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
    let near = crate::diag::suggest(word, &fields).map(|n| format!(" (did you mean `{n}`?)")).unwrap_or_default();
    Some(format!("unknown field{near}; expected one of {}", fields.join(", ")))
}

/// A string field: absent or `null` is `None`; blank is a mistake.
fn text<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    use serde::de::Error;
    match Option::<Value>::deserialize(d)? {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if !s.trim().is_empty() => Ok(Some(s)),
        Some(Value::String(_)) => Err(D::Error::custom("must not be empty")),
        Some(_) => Err(D::Error::custom("must be a string")),
    }
}

/// An object field, `null` being absent; `what` is the message otherwise.
fn object_field<'de, D: Deserializer<'de>>(d: D, what: &str) -> Result<Option<Map<String, Value>>, D::Error> {
    use serde::de::Error;
    match Option::<Value>::deserialize(d)? {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(m)) => Ok(Some(m)),
        Some(_) => Err(D::Error::custom(what)),
    }
}

fn inputs<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Map<String, Value>>, D::Error> {
    object_field(d, "must be an object")
}

fn output<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Map<String, Value>>, D::Error> {
    object_field(d, "must be an object, e.g. {\"kind\": \"comment\"}")
}

fn subject<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    use serde::de::Error;
    match Option::<Value>::deserialize(d)? {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_u64().filter(|n| *n > 0) {
            Some(n) => Ok(Some(n)),
            None => Err(D::Error::custom("must be an issue or PR number")),
        },
    }
}

fn share<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    use serde::de::Error;
    match Option::<Value>::deserialize(d)? {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_u64().and_then(|n| u32::try_from(n).ok()).filter(|n| *n >= 1) {
            Some(n) => Ok(Some(n)),
            None => Err(D::Error::custom("must be a positive whole number")),
        },
    }
}

/// `GET /api/jobs`'s query. The route reads it leniently (an unknown
/// parameter is ignored, a bad one named in its own words); clients write
/// it from this.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct JobsQuery {
    /// queued | running | succeeded | failed | cancelled: a string, so a
    /// wrong one gets the API's own answer naming the right ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trigger: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repo: Option<String>,
    /// Only the children of this job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// Only the jobs of this delivery (the answer then says what it skipped).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery: Option<String>,
    /// At most this many (default 100, at most `MAX_LIMIT`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
    /// An earlier page's `next`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
}

/// `GET /api/jobs`: a page of jobs, newest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobList {
    pub jobs: Vec<Job>,
    /// The cursor of the next page when this one is full (else `null`).
    pub next: Option<String>,
    /// With `delivery`: what it matched but did not start, and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skipped: Option<Vec<Skipped>>,
}

/// Every error answer: `{"error"}`, plus the field a 400 names or the
/// reason a 429 gives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ErrorBody {
    pub error: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// Why a matched request started no job (rate limit, budget, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
}

impl ErrorBody {
    pub fn new(error: impl Into<String>) -> ErrorBody {
        ErrorBody { error: error.into(), field: None, skipped: None }
    }
}

impl From<BadField> for ErrorBody {
    fn from(bad: BadField) -> ErrorBody {
        ErrorBody { error: bad.to_string(), field: Some(bad.field), skipped: None }
    }
}

/// `GET /api/triggers`: every trigger in force, and every file that failed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TriggerList {
    pub triggers: Vec<TriggerInfo>,
    pub errors: Vec<TriggerError>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TriggerInfo {
    pub name: String,
    pub file: String,
    pub description: Option<String>,
    pub on: Vec<String>,
    pub agent: String,
}

/// A trigger file that did not load, as `baton check` prints it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TriggerError {
    pub file: String,
    pub line: usize,
    pub col: usize,
    pub message: String,
    /// `path:line:col: message`.
    pub error: String,
}

/// `GET /healthz`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Health {
    pub ok: bool,
}

/// `GET /readyz` once the daemon has recovered and serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Ready {
    pub ready: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn bad<T: serde::de::DeserializeOwned + std::fmt::Debug>(body: Value) -> BadField {
        match parse::<T>(body.to_string().as_bytes()) {
            Ok(t) => panic!("{body} was taken: {t:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn each_request_rejects_an_unknown_field_naming_it() {
        let e = bad::<CreateJob>(json!({"trigger": "t", "colour": "red"}));
        assert_eq!(e.field, "colour");
        assert!(e.message.starts_with("unknown field; expected one of trigger, inputs, agent"), "{e}");
        let e = bad::<CreateChild>(json!({"agent": "a", "prompt": "p", "inputs": {}}));
        assert_eq!(e.field, "inputs");
        assert!(e.message.contains("unknown field") && e.message.contains("share"), "{e}");
        // A near miss says what was likely meant.
        let e = bad::<CreateJob>(json!({"promt": "x"}));
        assert_eq!((e.field.as_str(), e.to_string().contains("did you mean `prompt`")), ("promt", true), "{e}");
    }

    #[test]
    fn each_field_rule_names_its_field() {
        for (body, field, says) in [
            (json!({"trigger": ""}), "trigger", "must not be empty"),
            (json!({"agent": 3}), "agent", "must be a string"),
            (json!({"ref": "  "}), "ref", "must not be empty"),
            (json!({"inputs": [1]}), "inputs", "must be an object"),
            (json!({"output": "comment"}), "output", "e.g. {\"kind\": \"comment\"}"),
            (json!({"subject": "seven"}), "subject", "issue or PR number"),
            (json!({"subject": 0}), "subject", "issue or PR number"),
        ] {
            let e = bad::<CreateJob>(body.clone());
            assert_eq!(e.field, field, "{body}: {e}");
            assert!(e.message.contains(says), "{body}: {e}");
        }
        for share in [json!(0), json!(-1), json!(1.5), json!(u64::MAX), json!("2")] {
            let e = bad::<CreateChild>(json!({ "share": share }));
            assert_eq!((e.field.as_str(), e.message.as_str()), ("share", "must be a positive whole number"));
        }
        assert_eq!(parse::<CreateJob>(b"[1]").unwrap_err().to_string(), "body: must be a JSON object");
        assert!(parse::<CreateJob>(b"{").unwrap_err().to_string().starts_with("body: not JSON"));
    }

    #[test]
    fn null_is_absent_and_requests_round_trip() {
        let req: CreateJob = parse(br#"{"trigger": null, "agent": "a", "ref": "main", "subject": 7}"#).unwrap();
        assert_eq!(req.trigger, None);
        assert_eq!((req.git_ref.as_deref(), req.subject), (Some("main"), Some(7)));
        // What a client sends is what the route reads, absent fields left out.
        let wire = serde_json::to_value(&req).unwrap();
        assert_eq!(wire, json!({"agent": "a", "ref": "main", "subject": 7}));
        assert_eq!(from_object::<CreateJob>(wire.as_object().cloned().unwrap()).unwrap(), req);
        let child = CreateChild { agent: Some("a".into()), share: Some(2), ..Default::default() };
        assert_eq!(parse::<CreateChild>(serde_json::to_string(&child).unwrap().as_bytes()).unwrap(), child);
    }

    #[test]
    fn answers_round_trip_in_the_shape_the_routes_wrote() {
        let spec = crate::rules::JobSpec { trigger: "t".into(), agent: "a".into(), ..Default::default() };
        let job = Job::new("j1".into(), 1, "d".into(), spec, chrono::Utc::now());
        let list = JobList { jobs: vec![job.clone()], next: Some("1".into()), skipped: None };
        let v = serde_json::to_value(&list).unwrap();
        assert_eq!(v, json!({ "jobs": [job.clone()], "next": "1" }), "no `skipped` without a delivery");
        assert_eq!(serde_json::from_value::<JobList>(v).unwrap(), list);
        let last = JobList { jobs: vec![], next: None, skipped: Some(vec![]) };
        assert_eq!(serde_json::to_value(&last).unwrap(), json!({ "jobs": [], "next": null, "skipped": [] }));
        assert_eq!(serde_json::from_value::<Job>(serde_json::to_value(&job).unwrap()).unwrap(), job);

        let e = ErrorBody::from(BadField::new("colour", "unknown field"));
        assert_eq!(serde_json::to_value(&e).unwrap(), json!({"error": "colour: unknown field", "field": "colour"}));
        assert_eq!(serde_json::to_value(ErrorBody::new("gone")).unwrap(), json!({"error": "gone"}));
        let busy = ErrorBody { skipped: Some("rate".into()), ..ErrorBody::new("not started: rate") };
        assert_eq!(serde_json::from_value::<ErrorBody>(serde_json::to_value(&busy).unwrap()).unwrap(), busy);

        let triggers = TriggerList {
            triggers: vec![TriggerInfo {
                name: "t".into(),
                file: "triggers/t.toml".into(),
                description: None,
                on: vec!["api".into()],
                agent: "codex".into(),
            }],
            errors: vec![TriggerError {
                file: "triggers/u.toml".into(),
                line: 1,
                col: 2,
                message: "m".into(),
                error: "triggers/u.toml:1:2: m".into(),
            }],
        };
        let v = serde_json::to_value(&triggers).unwrap();
        assert_eq!(
            v["triggers"][0],
            json!({"name": "t", "file": "triggers/t.toml", "description": null, "on": ["api"], "agent": "codex"})
        );
        assert_eq!(serde_json::from_value::<TriggerList>(v).unwrap(), triggers);
        let q = JobsQuery { state: Some("failed".into()), limit: Some(5), ..Default::default() };
        assert_eq!(serde_json::to_value(&q).unwrap(), json!({"state": "failed", "limit": 5}));
    }
}
