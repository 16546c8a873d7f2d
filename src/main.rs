use std::process::ExitCode;

use agentcast::config::{Cli, Command, EXIT_CONFIG, LogFormat};
use clap::{CommandFactory, Parser};

/// Default log filter of `serve` and `dev` (see `init_logging`).
const NODE_LOG_LEVEL: &str = "warn,agentcast=info";
/// The log target of tungstenite's trace of a client request (see `init_logging`).
const HANDSHAKE_TRACE_TARGET: &str = "tungstenite::handshake::client";
/// Default log filter of the tools: warnings only, their output is on stdout.
const TOOL_LOG_LEVEL: &str = "warn";

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
            eprintln!(
                "agentcast: {}",
                usage_line(&e.render().to_string(), &std::env::args().skip(1).collect::<Vec<_>>())
            );
            return ExitCode::from(EXIT_CONFIG as u8);
        }
    };
    // The tools log only warnings unless asked: their output is the point.
    // A node logs its own story at info and its dependencies (async-nats's
    // "connected successfully" and "event: connected" for each of its five
    // connections, hyper, tungstenite) only at warn: at info they drowned
    // the first screen of `agentcast dev`. AGENTCAST_LOG replaces this.
    let default_level =
        if matches!(cli.command, Command::Serve(_) | Command::Dev(_)) { NODE_LOG_LEVEL } else { TOOL_LOG_LEVEL };
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

/// One line from clap's message: its first paragraph (the problem, and on
/// the lines under it the flags it is about, as in "the following required
/// arguments were not provided:" followed by "--url <URLS>"), joined, then
/// where to read more. Errors stay one line on stderr, as the tools' do.
fn usage_line(rendered: &str, args: &[String]) -> String {
    let problem = rendered
        .lines()
        .take_while(|l| !l.trim().is_empty())
        .map(str::trim)
        .collect::<Vec<_>>()
        .join(" ")
        .trim_start_matches("error: ")
        .to_owned();
    // The subcommand given, if any: its --help lists its flags.
    let subcommands: Vec<String> = Cli::command().get_subcommands().map(|c| c.get_name().to_owned()).collect();
    let command = args
        .iter()
        .find(|a| subcommands.contains(a))
        .map(|sub| format!("agentcast {sub}"))
        .unwrap_or_else(|| "agentcast".to_owned());
    format!("{problem} (see '{command} --help')")
}

fn init_logging(format: LogFormat, default_level: &str) {
    use tracing_subscriber::prelude::*;
    use tracing_subscriber::{EnvFilter, filter::filter_fn, fmt};
    let filter = EnvFilter::try_from_env("AGENTCAST_LOG").unwrap_or_else(|_| EnvFilter::new(default_level));
    // tungstenite traces each client handshake request as sent, headers and
    // all, so `tail`'s token would be logged at AGENTCAST_LOG=trace; that
    // one line is never shown. (The token is in a header, so tungstenite's
    // debug line with the URL carries none.)
    let no_credentials = filter_fn(|m| !(m.target() == HANDSHAKE_TRACE_TARGET && *m.level() == tracing::Level::TRACE));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let registry = tracing_subscriber::registry().with(filter).with(no_credentials);
    match format {
        LogFormat::Human => registry.with(fmt::layer().with_writer(std::io::stderr).with_ansi(ansi)).init(),
        LogFormat::Json => registry.with(fmt::layer().json().with_writer(std::io::stderr).with_ansi(ansi)).init(),
    }
}
