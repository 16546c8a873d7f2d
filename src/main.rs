use std::process::ExitCode;

use agentcast::config::{Cli, Command, EXIT_CONFIG, LogFormat};
use clap::Parser;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            // One line: clap's first line names the flag and the problem.
            let text = e.render().to_string();
            let line = text.lines().next().unwrap_or("invalid arguments").trim_start_matches("error: ");
            eprintln!("agentcast: {line}");
            return ExitCode::from(EXIT_CONFIG as u8);
        }
    };
    // The tools log only warnings unless asked: their output is the point.
    let default_level = if matches!(cli.command, Command::Serve(_) | Command::Dev(_)) { "info" } else { "warn" };
    init_logging(cli.log_format, default_level);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("agentcast: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => {
                let config = match args.jwt.authenticator().and_then(|auth| args.node.into_config(auth)) {
                    Ok(c) => c,
                    Err(e) => {
                        eprintln!("agentcast: {e}");
                        return EXIT_CONFIG;
                    }
                };
                let shutdown = agentcast::server::shutdown_on_signals();
                match agentcast::server::start(config, shutdown, |_| {}).await {
                    Ok(()) => 0,
                    Err(e) => {
                        eprintln!("agentcast: {e}");
                        e.exit_code()
                    }
                }
            }
            Command::Dev(args) => agentcast::dev::run(args).await,
            Command::Publish(args) => agentcast::tools::publish(args).await,
            Command::Tail(args) => agentcast::tools::tail(args).await,
            Command::Token(args) => agentcast::tools::token(args),
            Command::Stream(args) => agentcast::tools::stream(args).await,
        }
    });
    ExitCode::from(code as u8)
}

fn init_logging(format: LogFormat, default_level: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("AGENTCAST_LOG").unwrap_or_else(|_| EnvFilter::new(default_level));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
