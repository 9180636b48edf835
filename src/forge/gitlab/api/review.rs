//! A merge request's review on GitLab: its diff version and files, and
//! the review itself as draft notes published at once, each placed by a
//! `position` GitLab accepts (unchanged lines by both their numbers, ranges
//! by their ends' line codes).

use sha1::Digest as _;

use super::*;

#[derive(Serialize)]
struct DraftNoteBody<'a> {
    note: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    position: Option<Position<'a>>,
}

#[derive(Debug, Serialize)]
struct Position<'a> {
    position_type: &'static str,
    base_sha: &'a str,
    start_sha: &'a str,
    head_sha: &'a str,
    old_path: &'a str,
    new_path: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    old_line: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    new_line: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    line_range: Option<LineRange>,
}

#[derive(Debug, Serialize)]
struct LineRange {
    start: LineEnd,
    end: LineEnd,
}

#[derive(Debug, Serialize)]
struct LineEnd {
    line_code: String,
    /// `new` for a line the change added, else `old` (as GitLab's
    /// discussions documentation says).
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    old_line: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    new_line: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct DraftNote {
    id: u64,
    #[serde(default)]
    author_id: u64,
}

impl Client {
    /// The MR's latest diff version (GitLab lists the newest first). An MR
    /// whose diff GitLab has not computed yet has none: worth another try.
    pub async fn mr_version(&self, project: &str, iid: u64) -> Result<Version, ApiError> {
        let route = format!("/projects/{}/merge_requests/{iid}/versions", enc(project));
        let versions: Vec<Version> = self.get(&route).await?;
        versions
            .into_iter()
            .next()
            .ok_or_else(|| ApiError::before_sending(format!("merge request !{iid} has no diff version yet")))
    }

    /// The MR's changed files, every page up to a bound.
    pub async fn mr_diffs(&self, project: &str, iid: u64) -> Result<Vec<FileDiff>, ApiError> {
        let route = format!("/projects/{}/merge_requests/{iid}/diffs", enc(project));
        let mut files = Vec::new();
        for page in 1..=MAX_DIFF_PAGES {
            let (list, more) = self.page::<FileDiff>(&route, page).await?;
            files.extend(list);
            if !more {
                break;
            }
        }
        Ok(files)
    }

    /// One review, published at once so it is all-or-nothing: GitLab has no
    /// call that posts a review with its comments, but draft notes are
    /// seen by no one until `bulk_publish`. Leftover drafts of baton's (a
    /// crashed earlier try) are deleted first, so only this try's are
    /// published. Returns the summary note, found after publishing by its
    /// marker (the published note's id is not the draft's).
    pub async fn publish_review(&self, project: &str, iid: u64, review: &Review<'_>) -> Result<Created, ApiError> {
        let me = self.identity().await?.clone();
        let drafts_route = format!("/projects/{}/merge_requests/{iid}/draft_notes", enc(project));
        // Drafts are only ever listed to their author; the check is belt and braces.
        let drafts: Vec<DraftNote> = self.get(&drafts_route).await?;
        for draft in drafts.iter().filter(|d| d.author_id == 0 || d.author_id == me.id) {
            let reply = self.send(self.request(Method::DELETE, &format!("{drafts_route}/{}", draft.id))?).await?;
            // Gone already (a concurrent try) is what was wanted.
            if reply.status != StatusCode::NOT_FOUND {
                self.check(reply)?;
            }
        }
        // Unchanged lines need both their numbers; only the diff tells
        // which lines are unchanged.
        let diffs = if review.comments.is_empty() { Vec::new() } else { self.mr_diffs(project, iid).await? };
        for comment in review.comments {
            let file = diffs.iter().find(|f| f.new_path == comment.path);
            let lines = file.map(|f| diff_lines(&f.diff)).unwrap_or_default();
            let position = position(review.version, comment, &lines);
            let _: serde_json::Value = self
                .write(Method::POST, &drafts_route, &DraftNoteBody { note: &comment.body, position: Some(position) })
                .await?;
        }
        let _: serde_json::Value =
            self.write(Method::POST, &drafts_route, &DraftNoteBody { note: review.summary, position: None }).await?;
        let reply = self.send(self.request(Method::POST, &format!("{drafts_route}/bulk_publish"))?).await?;
        self.check(reply)?;
        Ok(self.find_note(project, Noteable::MergeRequest(iid), review.marker).await?.unwrap_or_default())
    }

    /// Approves the MR. A refusal because baton already approved it counts
    /// as done, but only when GitLab's list of approvers shows baton: a 401
    /// or 403 can as well mean baton may not approve at all.
    pub async fn approve(&self, project: &str, iid: u64) -> Result<(), ApiError> {
        let route = format!("/projects/{}/merge_requests/{iid}", enc(project));
        let reply = self.send(self.request(Method::POST, &format!("{route}/approve"))?).await?;
        if !matches!(reply.status.as_u16(), 401 | 403) {
            return self.check(reply).map(|_| ());
        }
        let refused = self.classify(&reply);
        let me = self.identity().await?.clone();
        let approvals: Approvals = self.get(&format!("{route}/approvals")).await?;
        match approvals.approved_by.iter().any(|a| a.user.is(&me)) {
            true => Ok(()),
            false => Err(refused),
        }
    }
}

/// A line shown in a diff: its old and new numbers as GitLab counts them
/// (an added line carries the old file's next line number, a removed one
/// the new file's), and which side it is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DiffLine {
    old: u64,
    new: u64,
    kind: LineKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LineKind {
    Added,
    Removed,
    Context,
}

/// The lines a unified diff shows.
fn diff_lines(diff: &str) -> Vec<DiffLine> {
    let mut out = Vec::new();
    let (mut old, mut new) = (0u64, 0u64);
    let mut in_hunk = false;
    for line in diff.lines() {
        if let Some(header) = line.strip_prefix("@@") {
            // @@ -a[,b] +c[,d] @@
            let number = |sign: char| {
                header
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix(sign))
                    .and_then(|w| w.split(',').next())
                    .and_then(|n| n.parse::<u64>().ok())
            };
            if let (Some(o), Some(n)) = (number('-'), number('+')) {
                (old, new, in_hunk) = (o, n, true);
            }
            continue;
        }
        if !in_hunk {
            continue;
        }
        match line.as_bytes().first() {
            Some(b'+') => {
                out.push(DiffLine { old, new, kind: LineKind::Added });
                new += 1;
            }
            Some(b'-') => {
                out.push(DiffLine { old, new, kind: LineKind::Removed });
                old += 1;
            }
            Some(b'\\') => {}
            _ => {
                out.push(DiffLine { old, new, kind: LineKind::Context });
                old += 1;
                new += 1;
            }
        }
    }
    out
}

/// The diff line `line` on `side`, if the diff shows it.
fn shown(lines: &[DiffLine], side: Side, line: u64) -> Option<DiffLine> {
    lines.iter().copied().find(|l| match side {
        Side::New => l.kind != LineKind::Removed && l.new == line,
        Side::Old => l.kind != LineKind::Added && l.old == line,
    })
}

/// `old_line`/`new_line` for a line: both for an unchanged line (GitLab
/// cannot place it otherwise), one side for a changed line or one the diff
/// does not show.
fn numbers(found: Option<DiffLine>, side: Side, line: u64) -> (Option<u64>, Option<u64>) {
    match (found, side) {
        (Some(l), _) if l.kind == LineKind::Context => (Some(l.old), Some(l.new)),
        (_, Side::New) => (None, Some(line)),
        (_, Side::Old) => (Some(line), None),
    }
}

/// An inline comment's position in the MR's diff `version`.
fn position<'a>(version: &'a Version, c: &'a InlineNote, lines: &[DiffLine]) -> Position<'a> {
    let new_path = c.path.as_str();
    let old_path = c.old_path.as_deref().unwrap_or(new_path);
    let (old_line, new_line) = numbers(shown(lines, c.side, c.line), c.side, c.line);
    let line_range = c.start_line.filter(|s| *s < c.line).map(|start| {
        let end = |n: u64| {
            let found = shown(lines, c.side, n);
            let (old, new) = numbers(found, c.side, n);
            // The line code names both numbers, as GitLab counts them.
            let (code_old, code_new) = match found {
                Some(l) => (l.old, l.new),
                None => (old.unwrap_or(0), new.unwrap_or(0)),
            };
            let kind = match found.map(|l| l.kind) {
                Some(LineKind::Added) => "new",
                Some(_) => "old",
                None if c.side == Side::New => "new",
                None => "old",
            };
            LineEnd { line_code: line_code(new_path, code_old, code_new), kind, old_line: old, new_line: new }
        };
        LineRange { start: end(start), end: end(c.line) }
    });
    Position {
        position_type: "text",
        base_sha: &version.base_commit_sha,
        start_sha: &version.start_commit_sha,
        head_sha: &version.head_commit_sha,
        old_path,
        new_path,
        old_line,
        new_line,
        line_range,
    }
}

/// GitLab's line code: `<sha1 of the path>_<old>_<new>`.
fn line_code(path: &str, old: u64, new: u64) -> String {
    format!("{}_{old}_{new}", hex::encode(sha1::Sha1::digest(path.as_bytes())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_name_both_lines_of_an_unchanged_line() {
        let diff = "@@ -1,4 +1,5 @@\n a\n-b\n+B\n+C\n c\n d\n";
        let lines = diff_lines(diff);
        let v =
            Version { id: 1, base_commit_sha: "b".into(), start_commit_sha: "s".into(), head_commit_sha: "h".into() };
        let note = |side, line, start| InlineNote {
            path: "f.rs".into(),
            old_path: None,
            line,
            start_line: start,
            side,
            body: "x".into(),
        };
        // `c`: old 3, new 4.
        let c = note(Side::New, 4, None);
        let p = position(&v, &c, &lines);
        assert_eq!((p.old_line, p.new_line), (Some(3), Some(4)));
        let c = note(Side::New, 3, None);
        let p = position(&v, &c, &lines);
        assert_eq!((p.old_line, p.new_line), (None, Some(3)));
        let c = note(Side::Old, 2, None);
        let p = position(&v, &c, &lines);
        assert_eq!((p.old_line, p.new_line), (Some(2), None));
        let c = note(Side::New, 4, Some(2));
        let p = position(&v, &c, &lines);
        let range = p.line_range.expect("a range");
        assert_eq!(range.start.kind, "new");
        assert_eq!(range.start.line_code, format!("{}_3_2", hex::encode(sha1::Sha1::digest(b"f.rs"))));
        assert_eq!(range.end.kind, "old");
        assert_eq!((range.end.old_line, range.end.new_line), (Some(3), Some(4)));
    }
}
