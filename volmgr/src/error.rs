//! The volume manager's error type, with a [`ErrorKind`] the admin API maps to a status code.

use std::io;

use crate::catalog::CatalogError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("volume {0:?} does not exist")]
    NotFound(String),
    #[error("volume {0:?} already exists")]
    Exists(String),
    #[error("{0}")]
    Invalid(String),
    #[error("volume {name:?} has {connections} connected client(s); disconnect them first or use --force")]
    Busy { name: String, connections: usize },
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

/// What a caller can do about an [`Error`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The named thing does not exist.
    NotFound,
    /// The request conflicts with current state (exists already, clients connected).
    Conflict,
    /// The request itself is wrong; the message says what to fix.
    Invalid,
    /// The node failed (disk, catalog); retrying may help after the operator looks.
    Internal,
}

impl Error {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::NotFound(_) => ErrorKind::NotFound,
            Error::Exists(_) | Error::Busy { .. } => ErrorKind::Conflict,
            Error::Invalid(_) => ErrorKind::Invalid,
            Error::Catalog(_) | Error::Io { .. } => ErrorKind::Internal,
        }
    }

    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Error {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}
