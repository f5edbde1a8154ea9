use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = match kura::cli::Cli::try_parse() {
        Ok(cli) => cli,
        // Help and version go to stdout with 0; a usage error ends with one error line (JSON
        // when JSON logs were asked for) and exit code 2, kura's usage code as well as clap's.
        Err(err) => return ExitCode::from(kura::cli::report_parse_error(err) as u8),
    };
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
