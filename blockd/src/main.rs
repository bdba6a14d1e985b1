use clap::Parser;

fn main() -> std::process::ExitCode {
    let config = blockd::config::Config::parse();
    match blockd::server::run(config) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("blockd: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
