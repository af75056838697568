//! Progress bars for `sync` (indicatif), as a [`Monitor`].

use crate::args::Cli;
use hotsync::Monitor;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;

/// indicatif progress on a terminal (or with -v), nothing otherwise.
pub struct Bars {
    bar: Option<ProgressBar>,
    /// A dry run's plan: printed as it is made (`Some(true)`), dropped (`Some(false)`: the
    /// JSON summary is all that is printed), or kept for the caller (`None`).
    plan: Option<bool>,
}

impl Bars {
    pub fn new(cli: &Cli, suppress: bool) -> Bars {
        let show = !cli.quiet && !suppress && (std::io::stderr().is_terminal() || cli.verbose > 0);
        if !show {
            return Bars {
                bar: None,
                plan: None,
            };
        }
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr_with_hz(10));
        bar.set_style(ProgressStyle::with_template("{spinner} scanning: {pos} entries").unwrap());
        Bars {
            bar: Some(bar),
            plan: None,
        }
    }

    /// A dry run's plan is printed part by part as it is made (`print`), or not at all.
    pub fn streaming_plan(mut self, print: bool) -> Bars {
        self.plan = Some(print);
        self
    }
}

impl Monitor for Bars {
    fn scanned(&self, entries: u64) {
        if let Some(b) = &self.bar {
            b.set_position(entries);
        }
    }
    fn planned(&self, files: u64, bytes: u64) {
        if let Some(b) = &self.bar {
            b.set_style(
                ProgressStyle::with_template(
                    "{bar:30} {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}  {msg}",
                )
                .unwrap(),
            );
            b.set_length(bytes);
            b.set_position(0);
            b.set_message(format!("0/{files} files"));
            b.reset_eta();
        }
    }
    fn file_done(&self, bytes: u64) {
        if let Some(b) = &self.bar {
            b.inc(bytes);
        }
    }
    fn finished(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
    fn dry_run_part(&self, part: &hotsync::model::plan::Plan) -> bool {
        match self.plan {
            Some(print) => {
                if print {
                    crate::report::print_plan(part);
                }
                true
            }
            None => false,
        }
    }
}
