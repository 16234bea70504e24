//! `tracing` set-up: `AGENTWALL_LOG` is the filter, `AGENTWALL_LOG_FORMAT=json|text` the format.

use tracing_subscriber::EnvFilter;

#[derive(Debug, thiserror::Error)]
pub enum LoggingError {
    #[error("AGENTWALL_LOG_FORMAT={0:?} is not supported; use json or text")]
    BadFormat(String),
    #[error("AGENTWALL_LOG={value:?} is not a valid filter: {source}")]
    BadFilter {
        value: String,
        source: tracing_subscriber::filter::ParseError,
    },
}

/// Installs the global subscriber from the given values of `AGENTWALL_LOG` and
/// `AGENTWALL_LOG_FORMAT` (the caller reads the environment, so tests can pass values in).
pub fn init(filter: Option<&str>, format: Option<&str>) -> Result<(), LoggingError> {
    let filter = match filter {
        Some(v) => EnvFilter::try_new(v).map_err(|source| LoggingError::BadFilter {
            value: v.to_owned(),
            source,
        })?,
        None => EnvFilter::new("info"),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format.unwrap_or("text") {
        "text" => builder.try_init().ok(),
        "json" => builder.json().try_init().ok(),
        other => return Err(LoggingError::BadFormat(other.to_owned())),
    };
    Ok(())
}
