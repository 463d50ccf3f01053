//! The crawler's connector parts: per-site manners shared by the whole
//! process ([`sites`]), robots.txt ([`robots`]), polite fetching
//! ([`fetch`]), extraction of fields and links ([`extract`]) and sitemaps
//! ([`sitemap`]). The frontier (which URLs are known, which are done) and
//! the crawl loop live in the engine, over the state store.

pub mod extract;
pub mod fetch;
pub mod probe;
pub mod robots;
pub mod sitemap;
pub mod sites;

pub use extract::{Extracted, Extractor};
pub use fetch::{FetchOutcome, Fetched, Validators, fetch};
pub use sites::{Outcome, Site, SitePermit, SiteStats, Sites, shared};
