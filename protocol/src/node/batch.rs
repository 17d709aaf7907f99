//! Group commit: the engine work that is waiting runs as one store
//! transaction, and a failing step costs one extra transaction, not one per
//! step.

use crate::engine::{CommandOutcome, Engine, EngineError, Step, Store};
use crate::relay::RelayFrame;
use crate::time::Timestamp;

use super::Ticket;

/// The most steps in one transaction: enough to amortise the commit, few
/// enough that the first caller in a batch is not kept waiting long.
pub const MAX_BATCH: usize = 256;

/// What follows a step once its transaction committed.
#[derive(Debug)]
pub(crate) enum After {
    /// Nothing.
    Nothing,
    /// The command's outcome goes to whoever holds the ticket.
    Reply(Ticket),
    /// This frame goes to relay `relay` (a mailbox entry is acknowledged
    /// only once what it delivered is stored).
    Send {
        /// The relay's index.
        relay: usize,
        /// The frame.
        frame: Box<RelayFrame>,
    },
    /// The engine's timeout: a failure is retried a little later rather
    /// than at once, so a broken store is not hammered.
    Timeout,
}

/// What became of one step.
#[derive(Debug)]
pub(crate) enum Done {
    /// A command's outcome, for its ticket.
    Reply(Ticket, Result<CommandOutcome, EngineError>),
    /// A frame released by its step's commit.
    Send {
        /// The relay's index.
        relay: usize,
        /// The frame.
        frame: Box<RelayFrame>,
    },
    /// An input that failed even on its own; nothing of it took effect.
    InputFailed {
        /// Whether it was the engine's timeout.
        timeout: bool,
        /// Why.
        error: EngineError,
    },
}

/// Steps waiting for the engine, each with what follows it.
#[derive(Debug, Default)]
pub(crate) struct Batch {
    steps: Vec<Step>,
    after: Vec<After>,
}

impl Batch {
    pub(crate) fn push(&mut self, step: Step, after: After) {
        self.steps.push(step);
        self.after.push(after);
    }

    /// Makes `after` follow the step pushed last (the input a relay frame
    /// carried, whose commit an acknowledgement waits for). Without such a
    /// step, nothing is sent: the relay then sends the entry again.
    pub(crate) fn push_after_last(&mut self, after: After) {
        if let Some(last @ After::Nothing) = self.after.last_mut() {
            *last = after;
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// Runs every waiting step, at most [`MAX_BATCH`] per transaction.
    pub(crate) fn run<S: Store>(self, engine: &mut Engine<S>, now: Timestamp, done: &mut Vec<Done>) {
        let (mut steps, mut after) = (self.steps, self.after);
        while !steps.is_empty() {
            let cut = steps.len().min(MAX_BATCH);
            let rest_steps = steps.split_off(cut);
            let rest_after = after.split_off(cut);
            run_split(engine, now, steps, after, done);
            (steps, after) = (rest_steps, rest_after);
        }
    }
}

/// Runs `steps` as one transaction. If a step fails (nothing of the batch
/// was committed or released), the steps before it run again together, the
/// failing one alone (a command with a caller's mistake gets its error),
/// and the rest together. If the commit itself fails, each step is tried on
/// its own, so a transmit's result in particular still reaches the engine,
/// or its item would stay in flight.
fn run_split<S: Store>(
    engine: &mut Engine<S>,
    now: Timestamp,
    mut steps: Vec<Step>,
    mut after: Vec<After>,
    done: &mut Vec<Done>,
) {
    while !steps.is_empty() {
        if steps.len() == 1 {
            if let (Some(step), Some(after)) = (steps.pop(), after.pop()) {
                run_alone(engine, now, step, after, done);
            }
            return;
        }
        let failed = match engine.handle_batch(now, steps.clone()) {
            Ok(outcomes) => {
                // One outcome per command, in order.
                let mut outcomes = outcomes.into_iter();
                for after in after {
                    match after {
                        After::Nothing | After::Timeout => {}
                        After::Reply(ticket) => {
                            if let Some(outcome) = outcomes.next() {
                                done.push(Done::Reply(ticket, Ok(outcome)));
                            }
                        }
                        After::Send { relay, frame } => done.push(Done::Send { relay, frame }),
                    }
                }
                return;
            }
            Err(e) => e,
        };
        let Some(index) = failed.step.filter(|i| *i < steps.len()) else {
            for (step, after) in steps.into_iter().zip(after) {
                run_alone(engine, now, step, after, done);
            }
            return;
        };
        let mut rest_steps = steps.split_off(index);
        let mut rest_after = after.split_off(index);
        run_split(engine, now, steps, after, done);
        let (step, one) = (rest_steps.remove(0), rest_after.remove(0));
        run_alone(engine, now, step, one, done);
        (steps, after) = (rest_steps, rest_after);
    }
}

/// One step in a transaction of its own.
fn run_alone<S: Store>(engine: &mut Engine<S>, now: Timestamp, step: Step, after: After, done: &mut Vec<Done>) {
    match step {
        Step::Command(command) => {
            let outcome = engine.command(now, command);
            if let After::Reply(ticket) = after {
                done.push(Done::Reply(ticket, outcome));
            }
        }
        Step::Input(input) => match engine.handle(now, input) {
            Ok(()) => {
                if let After::Send { relay, frame } = after {
                    done.push(Done::Send { relay, frame });
                }
            }
            Err(error) => done.push(Done::InputFailed { timeout: matches!(after, After::Timeout), error }),
        },
    }
}
