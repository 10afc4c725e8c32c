//! The password policy and Argon2id hashing.
//!
//! A password is accepted when it has at least [`MIN_PASSWORD_LEN`] characters (and at most
//! [`MAX_PASSWORD_LEN`]) and zxcvbn scores it at least [`MIN_SCORE`] with the username as user
//! input, i.e. it is not on zxcvbn's lists of common passwords, words and names, nor a
//! variation of the username. Accepted passwords are stored as Argon2id PHC strings with a
//! random 16-byte salt; verification reads the parameters from the stored string.

use argon2::password_hash::Error as HashError;
use argon2::{Algorithm, Argon2, Params, PasswordHash, PasswordHasher, PasswordVerifier, Version};
use rand::{CryptoRng, RngCore};
use zxcvbn::feedback::Warning;

/// Fewest characters a password may have.
pub const MIN_PASSWORD_LEN: usize = 12;

/// Most characters a password may have (Argon2 would take more; this bounds the work an
/// attacker can make the server do per request).
pub const MAX_PASSWORD_LEN: usize = 256;

/// Lowest zxcvbn score accepted (0-4; 3 means about 10^10 guesses needed).
pub const MIN_SCORE: u8 = 3;

/// Salt length, bytes.
const SALT_LEN: usize = 16;

/// OWASP's Argon2id configurations (memory KiB, iterations), each with parallelism 1, from the
/// Password Storage Cheat Sheet. [`Argon2Params::new`] accepts parameters at least as strong as
/// one of them.
const OWASP_MINIMA: [(u32, u32); 5] = [
    (47_104, 1),
    (19_456, 2),
    (12_288, 3),
    (9_216, 4),
    (7_168, 5),
];

/// Why a password or a hashing parameter is refused, or hashing failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PasswordError {
    /// The password is shorter than [`MIN_PASSWORD_LEN`] characters.
    #[error(
        "password has {actual} characters; at least {min} are required: use a longer passphrase, e.g. four or more unrelated words"
    )]
    TooShort {
        /// The minimum.
        min: usize,
        /// The password's length in characters.
        actual: usize,
    },
    /// The password is longer than [`MAX_PASSWORD_LEN`] characters.
    #[error("password has {actual} characters; at most {max} are allowed")]
    TooLong {
        /// The maximum.
        max: usize,
        /// The password's length in characters.
        actual: usize,
    },
    /// The password is, or is close to, a commonly used password.
    #[error(
        "password is too common ({warning}): it is among the first guesses of any attacker; choose a passphrase of unrelated words that appears on no list"
    )]
    Common {
        /// zxcvbn's warning.
        warning: String,
    },
    /// The password is long enough but easy to guess (zxcvbn score below [`MIN_SCORE`]).
    #[error("password is too easy to guess (strength {score} of 4, at least {MIN_SCORE} required){}{}", warning.as_ref().map(|w| format!(": {w}")).unwrap_or_default(), if suggestions.is_empty() { String::new() } else { format!("; {}", suggestions.join(" ")) })]
    Weak {
        /// zxcvbn's score, 0-4.
        score: u8,
        /// zxcvbn's warning, if any.
        warning: Option<String>,
        /// zxcvbn's suggestions of what to do.
        suggestions: Vec<String>,
    },
    /// Argon2 parameters weaker than every OWASP configuration were asked for.
    #[error(
        "Argon2id parameters m={m_kib} KiB, t={t}, p={p} are weaker than OWASP's minimum (e.g. m=19456 KiB, t=2, p=1)"
    )]
    ParamsTooWeak {
        /// Memory, KiB.
        m_kib: u32,
        /// Iterations.
        t: u32,
        /// Parallelism.
        p: u32,
    },
    /// Argon2 refused the parameters or failed while hashing.
    #[error("argon2: {0}")]
    Hash(String),
    /// A stored password hash is not a readable Argon2 PHC string (edited outside Gridward).
    #[error("stored password hash is unreadable: {0}")]
    BadStoredHash(String),
    /// The random number generator failed (no salt).
    #[error("random number generator failed: {0}")]
    Rng(String),
}

/// Argon2id cost parameters for new password hashes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Argon2Params {
    m_kib: u32,
    t: u32,
    p: u32,
}

impl Argon2Params {
    /// OWASP's recommendation: m = 19456 KiB (19 MiB), t = 2, p = 1. The default.
    pub const OWASP: Self = Self {
        m_kib: 19_456,
        t: 2,
        p: 1,
    };

    /// Parameters for production: refused unless at least as strong as one of OWASP's
    /// configurations (memory and iterations both at least those of one row, p >= 1).
    ///
    /// # Errors
    ///
    /// [`PasswordError::ParamsTooWeak`], [`PasswordError::Hash`] (beyond Argon2's limits).
    pub fn new(m_kib: u32, t: u32, p: u32) -> Result<Self, PasswordError> {
        let strong = p >= 1 && OWASP_MINIMA.iter().any(|&(m0, t0)| m_kib >= m0 && t >= t0);
        if !strong {
            return Err(PasswordError::ParamsTooWeak { m_kib, t, p });
        }
        let params = Self { m_kib, t, p };
        params.argon2()?;
        Ok(params)
    }

    /// INSECURE: the cheapest parameters Argon2 accepts (m = 8 KiB, t = 1, p = 1), so that tests
    /// do not spend seconds hashing. Never use them outside tests: a stolen database hashed with
    /// them falls to a brute-force search quickly.
    pub fn insecure_test_params() -> Self {
        Self {
            m_kib: Params::MIN_M_COST,
            t: 1,
            p: 1,
        }
    }

    /// Memory cost, KiB.
    pub fn m_kib(&self) -> u32 {
        self.m_kib
    }

    /// Iterations.
    pub fn t(&self) -> u32 {
        self.t
    }

    /// Parallelism.
    pub fn p(&self) -> u32 {
        self.p
    }

    fn argon2(&self) -> Result<Argon2<'static>, PasswordError> {
        let params = Params::new(self.m_kib, self.t, self.p, None)
            .map_err(|e| PasswordError::Hash(e.to_string()))?;
        Ok(Argon2::new(Algorithm::Argon2id, Version::V0x13, params))
    }
}

impl Default for Argon2Params {
    fn default() -> Self {
        Self::OWASP
    }
}

/// Checks `password` against the policy for the user `username`.
///
/// # Errors
///
/// [`PasswordError::TooShort`], [`PasswordError::TooLong`], [`PasswordError::Common`],
/// [`PasswordError::Weak`].
pub fn check_policy(username: &str, password: &str) -> Result<(), PasswordError> {
    let actual = password.chars().count();
    if actual < MIN_PASSWORD_LEN {
        return Err(PasswordError::TooShort {
            min: MIN_PASSWORD_LEN,
            actual,
        });
    }
    if actual > MAX_PASSWORD_LEN {
        return Err(PasswordError::TooLong {
            max: MAX_PASSWORD_LEN,
            actual,
        });
    }
    let entropy = zxcvbn::zxcvbn(password, &[username, "gridward"]);
    let score = u8::from(entropy.score());
    if score >= MIN_SCORE {
        return Ok(());
    }
    let feedback = entropy.feedback();
    let warning = feedback.and_then(|f| f.warning());
    if let Some(
        w @ (Warning::ThisIsATop10Password
        | Warning::ThisIsATop100Password
        | Warning::ThisIsACommonPassword
        | Warning::ThisIsSimilarToACommonlyUsedPassword),
    ) = warning
    {
        return Err(PasswordError::Common {
            warning: w.to_string(),
        });
    }
    Err(PasswordError::Weak {
        score,
        warning: warning.map(|w| w.to_string()),
        suggestions: feedback
            .map(|f| f.suggestions().iter().map(ToString::to_string).collect())
            .unwrap_or_default(),
    })
}

/// Hashes `password` with Argon2id under `params` and a random salt; returns the PHC string.
///
/// # Errors
///
/// [`PasswordError::Rng`], [`PasswordError::Hash`].
pub fn hash_password(
    params: &Argon2Params,
    password: &str,
    rng: &mut (impl RngCore + CryptoRng),
) -> Result<String, PasswordError> {
    let mut salt = [0u8; SALT_LEN];
    rng.try_fill_bytes(&mut salt)
        .map_err(|e| PasswordError::Rng(e.to_string()))?;
    let hash = params
        .argon2()?
        .hash_password_with_salt(password.as_bytes(), &salt)
        .map_err(|e| PasswordError::Hash(e.to_string()))?;
    Ok(hash.to_string())
}

/// Whether `password` matches the PHC string `phc` (with the parameters stored in it).
///
/// # Errors
///
/// [`PasswordError::BadStoredHash`], [`PasswordError::Hash`].
pub fn verify_password(phc: &str, password: &str) -> Result<bool, PasswordError> {
    let hash = PasswordHash::new(phc).map_err(|e| PasswordError::BadStoredHash(e.to_string()))?;
    if hash.algorithm.as_str() != "argon2id" {
        return Err(PasswordError::BadStoredHash(format!(
            "algorithm {} is not argon2id",
            hash.algorithm
        )));
    }
    match Argon2::default().verify_password(password.as_bytes(), &hash) {
        Ok(()) => Ok(true),
        Err(HashError::PasswordInvalid) => Ok(false),
        Err(e) => Err(PasswordError::Hash(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::OsRng;

    #[test]
    fn short_password_is_refused_with_the_rule() {
        let e = check_policy("alice", "Tr0ub4dor&3").unwrap_err();
        assert_eq!(
            e,
            PasswordError::TooShort {
                min: 12,
                actual: 11
            }
        );
        assert!(e.to_string().contains("at least 12"), "{e}");
    }

    #[test]
    fn overlong_password_is_refused() {
        let long = "correct horse battery staple ".repeat(10);
        assert!(matches!(
            check_policy("alice", &long),
            Err(PasswordError::TooLong { max: 256, .. })
        ));
    }

    #[test]
    fn common_password_is_refused() {
        let e = check_policy("alice", "password1234").unwrap_err();
        assert!(matches!(e, PasswordError::Common { .. }), "{e:?}");
        assert!(e.to_string().contains("too common"), "{e}");
    }

    #[test]
    fn weak_password_is_refused_with_advice() {
        // Long enough, not a listed password, but a keyboard row and a repeat.
        let e = check_policy("alice", "qwertyuiopqwertyuiop").unwrap_err();
        assert!(
            matches!(e, PasswordError::Weak { .. } | PasswordError::Common { .. }),
            "{e:?}"
        );
        let e = check_policy("alice", "aaaaaaaaaaaaaaaa").unwrap_err();
        assert!(
            matches!(e, PasswordError::Weak { score, .. } if score < 3),
            "{e:?}"
        );
    }

    #[test]
    fn username_variations_are_refused() {
        let e = check_policy("maximilian.stromberg", "maximilian.stromberg1").unwrap_err();
        assert!(
            matches!(e, PasswordError::Weak { .. } | PasswordError::Common { .. }),
            "{e:?}"
        );
    }

    #[test]
    fn strong_password_is_accepted() {
        check_policy("alice", "violet-anchor-gravel-minute").unwrap();
    }

    #[test]
    fn hash_and_verify() {
        let params = Argon2Params::insecure_test_params();
        let phc = hash_password(&params, "violet-anchor-gravel-minute", &mut OsRng).unwrap();
        assert!(phc.starts_with("$argon2id$v=19$m=8,t=1,p=1$"), "{phc}");
        assert!(verify_password(&phc, "violet-anchor-gravel-minute").unwrap());
        assert!(!verify_password(&phc, "violet-anchor-gravel-minutE").unwrap());
        assert!(matches!(
            verify_password("not a hash", "x"),
            Err(PasswordError::BadStoredHash(_))
        ));
    }

    #[test]
    fn production_params_are_owasp_or_stronger() {
        assert_eq!(Argon2Params::default(), Argon2Params::OWASP);
        assert_eq!(
            (
                Argon2Params::OWASP.m_kib(),
                Argon2Params::OWASP.t(),
                Argon2Params::OWASP.p()
            ),
            (19_456, 2, 1)
        );
        Argon2Params::new(19_456, 2, 1).unwrap();
        Argon2Params::new(47_104, 1, 1).unwrap();
        Argon2Params::new(65_536, 3, 4).unwrap();
        assert!(matches!(
            Argon2Params::new(19_456, 1, 1),
            Err(PasswordError::ParamsTooWeak { .. })
        ));
        assert!(matches!(
            Argon2Params::new(8, 1, 1),
            Err(PasswordError::ParamsTooWeak { .. })
        ));
        assert!(Argon2Params::new(19_456, 2, 0).is_err());
    }
}
