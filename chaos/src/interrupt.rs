//! Stopping a tool early: the clusters it started must not outlive it.

/// Completes when the process receives SIGINT (Ctrl-C) or SIGTERM, naming the signal. A tool
/// races its work against this: dropping the work drops the clusters it holds, whose `Drop`
/// kills their processes, where the signal's default action would end the tool at once and
/// leave its nodes and etcd members running. Never completes if the handlers cannot be set.
async fn interrupted() -> Interrupt {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut terminate), Ok(mut interrupt)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
    else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = terminate.recv() => Interrupt::Terminate,
        _ = interrupt.recv() => Interrupt::Interrupt,
    }
}

/// Runs `work` to its end on `runtime`, unless SIGINT or SIGTERM comes first: then `work` is
/// dropped (and with it the clusters it holds, whose processes are killed) and the signal is
/// returned.
pub fn run_unless_interrupted<F: std::future::Future>(
    runtime: &tokio::runtime::Runtime,
    work: F,
) -> Result<F::Output, Interrupt> {
    runtime.block_on(async {
        tokio::select! {
            outcome = work => Ok(outcome),
            signal = interrupted() => Err(signal),
        }
    })
}

/// The signal that stopped a tool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interrupt {
    Interrupt,
    Terminate,
}

impl Interrupt {
    pub fn name(self) -> &'static str {
        match self {
            Interrupt::Interrupt => "SIGINT",
            Interrupt::Terminate => "SIGTERM",
        }
    }

    /// The shell's exit status for a process ended by this signal (128 + its number).
    pub fn exit_code(self) -> std::process::ExitCode {
        std::process::ExitCode::from(match self {
            Interrupt::Interrupt => 130,
            Interrupt::Terminate => 143,
        })
    }
}
