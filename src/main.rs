use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // clap exits with 2 on usage errors, which is kura's documented usage exit code too.
    let cli = kura::cli::Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("kura: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let code = runtime.block_on(kura::cli::run(cli));
    // Blocking pipeline threads may still be unwinding after a failure; don't wait for them.
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    ExitCode::from(code.clamp(0, 255) as u8)
}
