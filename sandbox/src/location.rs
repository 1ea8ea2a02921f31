//! Where a product's files are: a location as a provider writes it
//! (`products/population`), confined to a data directory. The marketplace
//! checks a location when a spec is registered; whoever reads the files (a
//! runner in the product's data center, or the embedded default) resolves
//! it inside its own data directory, never following a link out of it.

use std::path::{Component, Path, PathBuf};

/// Why a location is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LocationError {
    /// The location as written is not a folder inside a data directory.
    #[error("{0}; name a folder inside the server's data directory, like products/population")]
    Outside(&'static str),
    /// No such folder.
    #[error("{0}: no such folder in the data center's store")]
    Missing(String),
    /// The folder is reached through a link.
    #[error("{0} is reached through a link; name the folder itself")]
    Linked(String),
}

/// Checks a location as written: a relative path inside the data
/// directory, never an absolute path, a URI or a path that climbs out with
/// `..`.
///
/// # Errors
/// [`LocationError::Outside`], saying why.
pub fn check(location: &str) -> Result<(), LocationError> {
    if location.contains("://") {
        return Err(LocationError::Outside("URIs are not storage locations"));
    }
    let path = Path::new(location);
    if path.is_absolute() || location.starts_with('\\') {
        return Err(LocationError::Outside(
            "an absolute path is outside the data directory",
        ));
    }
    let mut depth = 0usize;
    for component in path.components() {
        match component {
            Component::Normal(part) => {
                // One spelling everywhere: an object store would
                // percent-encode the rest, and a provider's upload under
                // the literal name would not be where the location says.
                let plain = part.to_str().is_some_and(|part| {
                    part.chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
                });
                if !plain {
                    return Err(LocationError::Outside(
                        "a folder's name holds ASCII letters, digits, '.', '_' and '-' only",
                    ));
                }
                depth += 1;
            }
            Component::CurDir => {}
            _ => {
                return Err(LocationError::Outside(
                    "a location may not climb out of the data directory (..)",
                ));
            }
        }
    }
    if depth == 0 {
        return Err(LocationError::Outside(
            "the data directory itself is not a product's folder",
        ));
    }
    Ok(())
}

/// The folder of `location` inside `data_dir`, reached without following a
/// link: a link could lead out of the directory, or into another
/// provider's folder under a name an overlap check does not know.
///
/// # Errors
/// A location [`check`] refuses, one that does not exist, or one reached
/// through a link.
pub fn resolve(data_dir: &Path, location: &str) -> Result<PathBuf, LocationError> {
    check(location)?;
    let (Ok(root), Ok(resolved)) = (
        data_dir.canonicalize(),
        data_dir.join(location).canonicalize(),
    ) else {
        return Err(LocationError::Missing(location.to_owned()));
    };
    let lexical = Path::new(location)
        .components()
        .fold(root, |path, component| match component {
            Component::Normal(part) => path.join(part),
            _ => path,
        });
    if resolved != lexical {
        return Err(LocationError::Linked(location.to_owned()));
    }
    Ok(resolved)
}
