//! How a run's end becomes an attempt's [`Outcome`], and whether another
//! attempt could help: the one place that decides it, for the agent's run
//! and for the `verify` command's.
//!
//! The engine says how a run stopped ([`RunEnd`]) and words the error
//! itself; the decision is here, pure, and checked by the tables below.

use super::Outcome;

/// How a run stopped, as the engine saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// It never started (not installed, the sandbox refused it).
    NotStarted,
    /// Its process exited with this code (`None`: killed by a signal).
    Exited(Option<i32>),
    TimedOut,
    Cancelled,
    /// baton stopped it: its model use passed the run's budget.
    OverBudget,
    /// baton stopped it at a cap it meters itself (disk, files, `min_free`).
    Limit,
}

/// A run's end: how it stopped, and what was seen around it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RunEnd {
    pub stop: Stop,
    /// The sandbox recorded a cap the run ran into (memory, processes…),
    /// whatever its process's end looked like.
    pub limit: bool,
    /// The run's budget in dollars, when it had one.
    pub budget_usd: Option<f64>,
    /// What it spent, when its CLI said.
    pub(crate) spent_usd: Option<f64>,
}

impl RunEnd {
    /// A run that stopped so, with no cap, budget or spend to weigh.
    pub fn of(stop: Stop) -> RunEnd {
        RunEnd { stop, limit: false, budget_usd: None, spent_usd: None }
    }

    /// The exit code, when the process exited.
    fn code(&self) -> Option<i32> {
        match self.stop {
            Stop::Exited(code) => code,
            _ => None,
        }
    }
}

/// What the attempt does after a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The run did its part: the attempt goes on.
    Passed,
    Cancelled,
    Failed {
        outcome: Outcome,
        exit_code: Option<i32>,
        /// Whether another attempt could help.
        retry: bool,
    },
}

fn failed(outcome: Outcome, exit_code: Option<i32>, retry: bool) -> Verdict {
    Verdict::Failed { outcome, exit_code, retry }
}

/// The agent's run. A cap or a spent budget is not retried (the next
/// attempt would hit it again); a timeout or a failed exit is.
pub(crate) fn agent_run(end: &RunEnd) -> Verdict {
    if end.stop == Stop::NotStarted {
        return failed(Outcome::SpawnFailed, None, false);
    }
    if end.limit {
        return failed(Outcome::Limit, end.code(), false);
    }
    // Stopped by baton past its budget, or by the CLI's own cap (which
    // reads as a failed exit that spent it all).
    if let Some(budget) = end.budget_usd {
        let spent_all = end.spent_usd.is_some_and(|s| s >= budget);
        if end.stop == Stop::OverBudget || (spent_all && end.stop != Stop::Exited(Some(0))) {
            return failed(Outcome::Budget, end.code(), false);
        }
    }
    match end.stop {
        Stop::NotStarted => failed(Outcome::SpawnFailed, None, false),
        Stop::Cancelled => Verdict::Cancelled,
        // Only a run with a budget is watched: handled above.
        Stop::OverBudget => failed(Outcome::Budget, None, false),
        Stop::Limit => failed(Outcome::Limit, None, false),
        Stop::TimedOut => failed(Outcome::Timeout, None, true),
        Stop::Exited(Some(0)) => Verdict::Passed,
        Stop::Exited(code) => failed(Outcome::Exit, code, true),
    }
}

/// The `verify` command's run. A failed check is retried, its output in
/// the next prompt; it is recorded with exit code 0, the agent's.
pub(crate) fn verify_run(end: &RunEnd) -> Verdict {
    if end.stop == Stop::NotStarted {
        return failed(Outcome::VerifyFailed, None, false);
    }
    if end.limit {
        return failed(Outcome::Limit, end.code(), false);
    }
    match end.stop {
        Stop::Cancelled => Verdict::Cancelled,
        Stop::Exited(Some(0)) => Verdict::Passed,
        _ => failed(Outcome::VerifyFailed, Some(0), true),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSED: Verdict = Verdict::Passed;
    const CANCELLED: Verdict = Verdict::Cancelled;

    fn fail(outcome: Outcome, exit_code: Option<i32>, retry: bool) -> Verdict {
        failed(outcome, exit_code, retry)
    }

    fn end(stop: Stop, limit: bool, budget_usd: Option<f64>, spent_usd: Option<f64>) -> RunEnd {
        RunEnd { stop, limit, budget_usd, spent_usd }
    }

    fn check(decide: fn(&RunEnd) -> Verdict, table: &[(RunEnd, Verdict)]) {
        for (input, expected) in table {
            assert_eq!(decide(input), *expected, "{input:?}");
        }
    }

    #[test]
    fn an_agent_runs_end_as_its_outcome() {
        use Outcome::{Budget, Exit, SpawnFailed, Timeout};
        use Stop::*;
        check(
            agent_run,
            &[
                // How it stopped, nothing else to weigh.
                (RunEnd::of(Exited(Some(0))), PASSED),
                (RunEnd::of(Exited(Some(2))), fail(Exit, Some(2), true)),
                (RunEnd::of(Exited(None)), fail(Exit, None, true)),
                (RunEnd::of(TimedOut), fail(Timeout, None, true)),
                (RunEnd::of(Cancelled), CANCELLED),
                (RunEnd::of(NotStarted), fail(SpawnFailed, None, false)),
                (RunEnd::of(Stop::Limit), fail(Outcome::Limit, None, false)),
                (RunEnd::of(OverBudget), fail(Budget, None, false)),
                // A cap the sandbox saw wins over how the process ended,
                // a cancel and a success included.
                (end(Exited(Some(137)), true, None, None), fail(Outcome::Limit, Some(137), false)),
                (end(Exited(Some(0)), true, None, None), fail(Outcome::Limit, Some(0), false)),
                (end(Cancelled, true, None, None), fail(Outcome::Limit, None, false)),
                (end(TimedOut, true, Some(1.0), Some(5.0)), fail(Outcome::Limit, None, false)),
                // A budget: stopped by baton, or spent by the CLI's own cap.
                (end(OverBudget, false, Some(1.0), None), fail(Budget, None, false)),
                (end(OverBudget, false, Some(1.0), Some(0.5)), fail(Budget, None, false)),
                (end(Exited(Some(1)), false, Some(1.0), Some(1.0)), fail(Budget, Some(1), false)),
                (end(TimedOut, false, Some(1.0), Some(2.0)), fail(Budget, None, false)),
                (end(Cancelled, false, Some(1.0), Some(2.0)), fail(Budget, None, false)),
                // A success that spent it all is still a success.
                (end(Exited(Some(0)), false, Some(1.0), Some(2.0)), PASSED),
                // Under budget, or spend unknown: how it stopped decides.
                (end(Exited(Some(1)), false, Some(1.0), Some(0.5)), fail(Exit, Some(1), true)),
                (end(Exited(Some(1)), false, Some(1.0), None), fail(Exit, Some(1), true)),
                (end(TimedOut, false, Some(1.0), None), fail(Timeout, None, true)),
                (end(Cancelled, false, Some(1.0), Some(0.1)), CANCELLED),
                // Spend without a budget counts for nothing.
                (end(Exited(Some(3)), false, None, Some(100.0)), fail(Exit, Some(3), true)),
            ],
        );
    }

    #[test]
    fn a_verify_runs_end_as_its_outcome() {
        use Outcome::VerifyFailed;
        use Stop::*;
        check(
            verify_run,
            &[
                (RunEnd::of(Exited(Some(0))), PASSED),
                (RunEnd::of(Cancelled), CANCELLED),
                (RunEnd::of(NotStarted), fail(VerifyFailed, None, false)),
                // A failed check, however it failed, is retried with its output.
                (RunEnd::of(Exited(Some(1))), fail(VerifyFailed, Some(0), true)),
                (RunEnd::of(Exited(None)), fail(VerifyFailed, Some(0), true)),
                (RunEnd::of(TimedOut), fail(VerifyFailed, Some(0), true)),
                (RunEnd::of(OverBudget), fail(VerifyFailed, Some(0), true)),
                (RunEnd::of(Stop::Limit), fail(VerifyFailed, Some(0), true)),
                // A sandbox cap is not: the next check would hit it again.
                (end(Exited(Some(137)), true, None, None), fail(Outcome::Limit, Some(137), false)),
                (end(Cancelled, true, None, None), fail(Outcome::Limit, None, false)),
            ],
        );
    }
}
