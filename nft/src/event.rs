//! What another program did to one object of our tables, as `nft monitor` (or a check of the
//! table) reports it: the input of [`crate::repair`].

use crate::rules::Family;

/// What happened to one object of our tables, as one monitor line says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub family: Family,
    pub verb: Verb,
    pub object: Object,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verb {
    Add,
    Delete,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Object {
    Table,
    Chain(String),
    Set {
        name: String,
        map: bool,
    },
    Rule {
        chain: String,
    },
    /// One element, in nft's syntax (between the braces).
    Element {
        set: String,
        text: String,
    },
    /// Anything else nft reports in our table (flowtables, counters, ...).
    Other,
}

impl Event {
    /// A chain of this name exists in our table (as a check of the table finds it).
    pub fn added_chain(family: Family, name: &str) -> Event {
        Event {
            family,
            verb: Verb::Add,
            object: Object::Chain(name.to_owned()),
        }
    }

    pub fn added_set(family: Family, name: &str, map: bool) -> Event {
        Event {
            family,
            verb: Verb::Add,
            object: Object::Set {
                name: name.to_owned(),
                map,
            },
        }
    }
}
