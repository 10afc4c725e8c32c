//! How the binary prints an error: the chain of causes, each said once.

/// `err` and its causes joined by `": "`, leaving out every cause whose message an outer one
/// already contains, or that only restates a cause already said behind a prefix (SQLite's
/// `Error code 26: file is not a database` after `file is not a database`).
///
/// Library errors often put their source's message into their own (`cannot read X: {source}`)
/// and also return it from `source()`; anyhow's `{:#}` then prints it twice, or three times
/// through two such layers.
pub fn error_chain(err: &anyhow::Error) -> String {
    let mut text = String::new();
    let mut said: Vec<String> = Vec::new();
    for cause in err.chain() {
        let message = cause.to_string();
        let restated = said.iter().any(|m| message.ends_with(m.as_str()));
        said.push(message.clone());
        if message.is_empty() || text.contains(&message) || restated {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&message);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An error that, like many, says its source's message and also returns it as `source()`.
    #[derive(Debug, thiserror::Error)]
    #[error("opening the store gridward.db: {source}")]
    struct Open {
        source: std::io::Error,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("starting the head-end: {source}")]
    struct Start {
        source: Open,
    }

    /// Issue 17: `serve` printed the cause of a failed start three times.
    #[test]
    fn each_cause_is_printed_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "unable to open database file");
        let err = anyhow::Error::new(Start {
            source: Open { source: io },
        })
        .context("from gridward.toml");
        let text = error_chain(&err);
        assert_eq!(
            text,
            "from gridward.toml: starting the head-end: opening the store gridward.db: unable to open database file"
        );
        assert_eq!(text.matches("unable to open").count(), 1, "{text}");
        // SQLite (rusqlite over its FFI error): the words, then the code with the same words.
        #[derive(Debug, thiserror::Error)]
        #[error("Error code 26: file is not a database")]
        struct Ffi;
        #[derive(Debug, thiserror::Error)]
        #[error("file is not a database")]
        struct Sql {
            source: Ffi,
        }
        #[derive(Debug, thiserror::Error)]
        #[error("SQLite: {source}")]
        struct Store {
            source: Sql,
        }
        let sqlite = anyhow::Error::new(Store {
            source: Sql { source: Ffi },
        })
        .context("starting the head-end from gridward.toml");
        assert_eq!(
            error_chain(&sqlite),
            "starting the head-end from gridward.toml: SQLite: file is not a database"
        );
        // Causes that are not repeated are all kept, outermost first.
        let plain = anyhow::anyhow!("disk full")
            .context("writing x")
            .context("saving");
        assert_eq!(error_chain(&plain), "saving: writing x: disk full");
    }
}
