//! `baton-sandbox-init`: pid 1 of every agent sandbox (see
//! `baton::sandbox::init`). A binary of its own because it starts with
//! every run: this one maps a few megabytes where `baton` maps a hundred,
//! which is most of what starting it costs.

fn main() -> std::process::ExitCode {
    match baton::sandbox::init::InitArgs::parse(std::env::args_os().skip(1)) {
        Ok(args) => std::process::ExitCode::from(u8::try_from(baton::sandbox::init::run(args)).unwrap_or(1)),
        Err(e) => {
            eprintln!("baton-sandbox-init: {e}");
            std::process::ExitCode::from(127)
        }
    }
}
