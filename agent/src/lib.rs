//! Blixard agent library.
