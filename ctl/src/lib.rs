//! `overlayctl`'s library half: the command-line definition, shared with the
//! man page and completion generator (`xtask`).

pub mod cli;
