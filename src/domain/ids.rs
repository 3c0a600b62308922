//! Identifiers and quantities, each built only through a constructor that enforces the
//! contract, so that past the decoding boundary an invalid value cannot exist.

use std::fmt;
use std::sync::Arc;

/// The longest identifier the contract accepts, in characters.
pub const IDENTIFIER_LENGTH_MAX: usize = 128;
/// The longest product handle the contract accepts, in characters (`^[a-z0-9][a-z0-9._-]{0,63}$`).
pub const PRODUCT_HANDLE_LENGTH_MAX: usize = 64;
/// The largest quantity one grant or transfer request may carry.
pub const QUANTITY_MAX: u32 = 1_000_000;
/// The handle of the quantity product: one unit per counted participant.
pub const SEAT: &str = "seat";

/// Why a value was refused at the boundary; the sentence ends up in the dead-letter detail.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("must not be empty")]
    Empty,
    #[error("is {length} characters long, more than the {max} allowed")]
    TooLong { length: usize, max: usize },
    #[error("is not a product handle (lower-case letters, digits, '.', '_' or '-', starting with a letter or digit, at most 64 characters)")]
    NotAHandle,
    #[error("must be between 1 and {QUANTITY_MAX}, not {0}")]
    QuantityOutOfRange(i64),
    /// PostgreSQL's text cannot hold U+0000: an identifier with it could never be stored.
    #[error("contains the NUL character (U+0000), which text cannot hold")]
    Nul,
}

macro_rules! identifier {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Arc<str>);

        impl $name {
            /// Accepts a string of 1 to 128 characters.
            pub fn parse(value: &str) -> Result<Self, IdError> {
                check_identifier(value)?;
                Ok(Self(Arc::from(value)))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
                formatter.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(formatter, "{:?}", &*self.0)
            }
        }
    };
}

fn check_identifier(value: &str) -> Result<(), IdError> {
    if value.is_empty() {
        return Err(IdError::Empty);
    }
    // Counted in characters, as the contract states, not in bytes.
    let length = value.chars().count();
    if length > IDENTIFIER_LENGTH_MAX {
        return Err(IdError::TooLong {
            length,
            max: IDENTIFIER_LENGTH_MAX,
        });
    }
    if value.contains('\0') {
        return Err(IdError::Nul);
    }
    Ok(())
}

identifier!(
    /// The customer: owns one pool per product.
    OrgId
);
identifier!(
    /// A workspace (an event); belongs to exactly one organization.
    WorkspaceId
);
identifier!(
    /// A participant of one workspace.
    ParticipantId
);
identifier!(
    /// The producer's identifier of one input event; the key of exactly-once.
    EventId
);

/// A product handle: `seat`, or an advanced module such as `gamification`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Product(Arc<str>);

impl Product {
    pub fn parse(value: &str) -> Result<Self, IdError> {
        let bytes = value.as_bytes();
        let first_ok = bytes
            .first()
            .is_some_and(|byte| byte.is_ascii_lowercase() || byte.is_ascii_digit());
        let rest_ok = bytes.iter().skip(1).all(|byte| {
            byte.is_ascii_lowercase() || byte.is_ascii_digit() || matches!(byte, b'.' | b'_' | b'-')
        });
        if !first_ok || !rest_ok || bytes.len() > PRODUCT_HANDLE_LENGTH_MAX {
            return Err(IdError::NotAHandle);
        }
        Ok(Self(Arc::from(value)))
    }

    pub fn seat() -> Self {
        Self(Arc::from(SEAT))
    }

    /// Seats are the quantity product; every other handle is an advanced module.
    pub fn is_seat(&self) -> bool {
        &*self.0 == SEAT
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Product {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(&self.0)
    }
}

impl fmt::Debug for Product {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{:?}", &*self.0)
    }
}

/// A positive number of units in one grant or one transfer request (1 to 1,000,000).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Quantity(u32);

impl Quantity {
    pub fn parse(value: i64) -> Result<Self, IdError> {
        if (1..=i64::from(QUANTITY_MAX)).contains(&value) {
            Ok(Self(value as u32))
        } else {
            Err(IdError::QuantityOutOfRange(value))
        }
    }

    pub fn get(self) -> i64 {
        i64::from(self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_accept_1_to_128_characters_counted_as_characters() {
        assert_eq!(OrgId::parse(""), Err(IdError::Empty));
        assert!(OrgId::parse(&"a".repeat(128)).is_ok());
        assert_eq!(
            OrgId::parse(&"a".repeat(129)),
            Err(IdError::TooLong {
                length: 129,
                max: 128
            })
        );
        // 128 two-byte characters are 256 bytes but still 128 characters.
        assert!(WorkspaceId::parse(&"é".repeat(128)).is_ok());
        assert_eq!(ParticipantId::parse("p\u{0}1"), Err(IdError::Nul));
    }

    #[test]
    fn product_handles_follow_the_contract_pattern() {
        for good in [
            "seat",
            "gamification",
            "live-stream",
            "4k-streaming",
            "a.b_c",
            "0",
        ] {
            assert!(Product::parse(good).is_ok(), "{good}");
        }
        let long = "a".repeat(65);
        for bad in [
            "",
            "Seat",
            "-seat",
            ".x",
            "live stream",
            "模块",
            long.as_str(),
        ] {
            assert_eq!(Product::parse(bad), Err(IdError::NotAHandle), "{bad}");
        }
        assert!(Product::parse(&"a".repeat(64)).is_ok());
        assert!(Product::seat().is_seat());
        assert!(!Product::parse("gamification").unwrap().is_seat());
    }

    #[test]
    fn quantities_are_between_1_and_a_million() {
        assert!(Quantity::parse(0).is_err());
        assert!(Quantity::parse(-1).is_err());
        assert_eq!(Quantity::parse(1).unwrap().get(), 1);
        assert_eq!(Quantity::parse(1_000_000).unwrap().get(), 1_000_000);
        assert!(Quantity::parse(1_000_001).is_err());
    }
}
