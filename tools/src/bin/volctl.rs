use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = tools::volctl::Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("volctl: cannot start: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(tools::volctl::run(cli)) {
        Ok(out) => {
            print!("{out}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("volctl: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
