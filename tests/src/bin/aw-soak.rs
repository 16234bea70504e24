//! `cargo xtask soak [--minutes N]`: runs [`agentwall_tests::soak`] and prints its table;
//! exits 1 when the run found a problem.

fn main() -> std::process::ExitCode {
    let mut minutes = 10u64;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match (a.as_str(), args.next()) {
            ("--minutes", Some(n)) => match n.parse() {
                Ok(n) if n > 0 => minutes = n,
                _ => {
                    eprintln!("aw-soak: --minutes {n:?} is not a whole number of minutes above 0");
                    return std::process::ExitCode::from(2);
                }
            },
            _ => {
                eprintln!("usage: aw-soak [--minutes N]");
                return std::process::ExitCode::from(2);
            }
        }
    }
    let report = agentwall_tests::soak::run(std::time::Duration::from_secs(minutes * 60));
    print!("{report}");
    if report.problems().is_empty() {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}
