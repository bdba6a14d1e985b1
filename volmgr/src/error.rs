//! The volume manager's error type, with a [`ErrorKind`] the admin API maps to a status code.

use std::io;

use crate::catalog::CatalogError;
use crate::files::CreateFileError;

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
    #[error("volume {name:?} is unavailable: {reason}")]
    Unavailable { name: String, reason: String },
    #[error("no orphan file {0:?} in the volumes directory (volctl orphans list)")]
    NoOrphan(String),
    #[error("volume {name:?}: {source}")]
    CreateFile {
        name: String,
        #[source]
        source: CreateFileError,
    },
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
            Error::NotFound(_) | Error::NoOrphan(_) => ErrorKind::NotFound,
            Error::Exists(_) | Error::Busy { .. } | Error::Unavailable { .. } => {
                ErrorKind::Conflict
            }
            Error::Invalid(_) => ErrorKind::Invalid,
            // A size the filesystem cannot hold is the request's fault, not the node's.
            Error::CreateFile { source, .. } if too_large(&source.source) => ErrorKind::Invalid,
            Error::Io { source, .. } if too_large(source) => ErrorKind::Invalid,
            Error::Catalog(_) | Error::Io { .. } | Error::CreateFile { .. } => ErrorKind::Internal,
        }
    }

    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Error {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

fn too_large(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::FileTooLarge
}
