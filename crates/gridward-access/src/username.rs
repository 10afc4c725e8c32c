//! Usernames: `^[a-z0-9][a-z0-9._-]{0,63}$`.
//!
//! Lower case only, so that `Alice` and `alice` cannot be two users; no `:` (it separates issuer
//! and account in an `otpauth://` label, and user from name in the audit log's `user:NAME`).

/// Longest username, in bytes.
pub const MAX_USERNAME_LEN: usize = 64;

/// Why a string is not a valid username.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum UsernameError {
    /// The name is empty.
    #[error("username is empty")]
    Empty,
    /// The name is longer than [`MAX_USERNAME_LEN`] bytes.
    #[error("username is {0} bytes long; at most {MAX_USERNAME_LEN} are allowed")]
    TooLong(usize),
    /// The name contains a character outside `a-z 0-9 . _ -`.
    #[error("username contains {0:?}; only lower-case a-z, 0-9 and . _ - are allowed")]
    InvalidChar(char),
    /// The name starts with `.`, `_` or `-`.
    #[error("username must start with a lower-case letter or a digit")]
    BadStart,
}

/// Checks `name` against `^[a-z0-9][a-z0-9._-]{0,63}$`.
///
/// # Errors
///
/// [`UsernameError`], saying which rule is broken.
pub fn validate_username(name: &str) -> Result<(), UsernameError> {
    if name.is_empty() {
        return Err(UsernameError::Empty);
    }
    if name.len() > MAX_USERNAME_LEN {
        return Err(UsernameError::TooLong(name.len()));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-')))
    {
        return Err(UsernameError::InvalidChar(c));
    }
    if name.starts_with(['.', '_', '-']) {
        return Err(UsernameError::BadStart);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// `^[a-z0-9][a-z0-9._-]{0,63}$`, spelled out.
    fn reference(s: &str) -> bool {
        let b = s.as_bytes();
        let body = |c: &u8| matches!(c, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'-');
        !b.is_empty()
            && b.len() <= 64
            && matches!(b[0], b'a'..=b'z' | b'0'..=b'9')
            && b.iter().all(body)
    }

    proptest! {
        #[test]
        fn matches_the_documented_pattern(s in "[a-zA-Z0-9._: -]{0,70}|\\PC{0,10}") {
            prop_assert_eq!(validate_username(&s).is_ok(), reference(&s));
        }
    }

    #[test]
    fn accepts_and_rejects() {
        for ok in ["alice", "a", "0perator", "j.doe_2-x", &"a".repeat(64)] {
            validate_username(ok).unwrap();
        }
        assert_eq!(validate_username(""), Err(UsernameError::Empty));
        assert_eq!(
            validate_username(&"a".repeat(65)),
            Err(UsernameError::TooLong(65))
        );
        assert_eq!(
            validate_username("Alice"),
            Err(UsernameError::InvalidChar('A'))
        );
        assert_eq!(
            validate_username("a:b"),
            Err(UsernameError::InvalidChar(':'))
        );
        assert_eq!(
            validate_username("a b"),
            Err(UsernameError::InvalidChar(' '))
        );
        assert_eq!(validate_username("é"), Err(UsernameError::InvalidChar('é')));
        assert_eq!(validate_username("-x"), Err(UsernameError::BadStart));
        assert_eq!(validate_username(".x"), Err(UsernameError::BadStart));
    }
}
