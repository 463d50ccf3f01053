//! What a page yields: its kind (the first page kind whose pattern matches
//! its URL), the fields of its record, and the links to follow.
//!
//! Promises:
//! - Never fails on a page: malformed HTML is parsed as browsers do
//!   (html5ever), undecodable bytes become U+FFFD, a missing element is a
//!   `null` field (an empty list with `all`).
//! - Links are absolute, http(s) only, without fragments, de-duplicated
//!   within the page, and filtered by the crawl's rules (allow, deny,
//!   same site) before they reach the frontier.
//! - Text is the element's text with whitespace collapsed; `href`/`src`
//!   attributes are made absolute.

use std::collections::{BTreeSet, HashSet};

use caudal_core::config::{CrawlSourceConfig, FieldSpec};
use caudal_core::{Error, ErrorKind, Result};
use regex::{Regex, RegexSet};
use scraper::{Html, Selector};
use serde_json::{Map, Value};
use url::Url;

/// A crawl's compiled rules. Cheap to share (`Arc`) across threads.
#[derive(Debug)]
pub struct Extractor {
    kinds: Vec<Kind>,
    follow: Vec<Selector>,
    allow: Option<RegexSet>,
    deny: Option<RegexSet>,
    same_site: bool,
}

#[derive(Debug)]
struct Kind {
    name: String,
    pattern: Regex,
    fields: Vec<Field>,
    follow: Option<Vec<Selector>>,
}

#[derive(Debug)]
struct Field {
    name: String,
    selector: Selector,
    attr: Option<String>,
    all: bool,
}

/// What a page yielded.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Extracted {
    /// The page kind, if one matched.
    pub kind: Option<String>,
    /// The record's fields, when the kind has fields.
    pub fields: Option<Map<String, Value>>,
    /// Links to follow (absolute, filtered, in page order).
    pub links: Vec<String>,
}

fn config_error(what: String) -> Error {
    Error::new(ErrorKind::Config, what)
}

fn selector(css: &str) -> Result<Selector> {
    Selector::parse(css)
        .map_err(|e| config_error(format!("{css:?} is not a valid CSS selector: {e}")))
}

fn regex_set(patterns: &[String]) -> Result<Option<RegexSet>> {
    if patterns.is_empty() {
        return Ok(None);
    }
    RegexSet::new(patterns)
        .map(Some)
        .map_err(|e| config_error(format!("invalid URL pattern: {e}")))
}

impl Extractor {
    /// Compiles a crawl's rules (validation has checked them; this fails
    /// only on a configuration that skipped it).
    pub fn new(config: &CrawlSourceConfig) -> Result<Self> {
        let mut kinds = Vec::with_capacity(config.pages.len());
        for page in &config.pages {
            let pattern = Regex::new(&page.pattern).map_err(|e| {
                config_error(format!("page kind {:?}: invalid match: {e}", page.name))
            })?;
            let mut fields = Vec::with_capacity(page.fields.len());
            for (name, field) in &page.fields {
                let FieldSpec { css, attr, all } = field.spec();
                fields.push(Field {
                    name: name.clone(),
                    selector: selector(&css)?,
                    attr,
                    all,
                });
            }
            let follow = match &page.follow {
                Some(list) => Some(list.iter().map(|s| selector(s)).collect::<Result<_>>()?),
                None => None,
            };
            kinds.push(Kind {
                name: page.name.clone(),
                pattern,
                fields,
                follow,
            });
        }
        Ok(Self {
            kinds,
            follow: config
                .follow
                .iter()
                .map(|s| selector(s))
                .collect::<Result<_>>()?,
            allow: regex_set(&config.allow)?,
            deny: regex_set(&config.deny)?,
            same_site: config.same_site,
        })
    }

    /// The name of the page kind of `url`, if any.
    pub fn kind_of(&self, url: &str) -> Option<&str> {
        self.kind(url).map(|k| k.name.as_str())
    }

    fn kind(&self, url: &str) -> Option<&Kind> {
        self.kinds.iter().find(|k| k.pattern.is_match(url))
    }

    /// Whether a link to `url` may be followed from a crawl of `sites`
    /// (the hosts of its start URLs).
    pub fn admits(&self, url: &Url, sites: &HashSet<String>) -> bool {
        let text = url.as_str();
        if self.deny.as_ref().is_some_and(|d| d.is_match(text)) {
            return false;
        }
        if self.allow.as_ref().is_some_and(|a| !a.is_match(text)) {
            return false;
        }
        !self.same_site || host_of(url).is_some_and(|h| sites.contains(&h))
    }

    /// Extracts fields and links from the HTML `text` of the page at `url`.
    pub fn extract(&self, url: &Url, text: &str) -> Extracted {
        let kind = self.kind(url.as_str());
        let follow = kind.and_then(|k| k.follow.as_ref()).unwrap_or(&self.follow);
        let needs_fields = kind.is_some_and(|k| !k.fields.is_empty());
        if follow.is_empty() && !needs_fields {
            return Extracted {
                kind: kind.map(|k| k.name.clone()),
                ..Extracted::default()
            };
        }
        let html = Html::parse_document(text);
        // A <base href> changes what relative links resolve against.
        let base = Selector::parse("base[href]")
            .ok()
            .and_then(|s| html.select(&s).next())
            .and_then(|b| b.value().attr("href"))
            .and_then(|h| url.join(h).ok())
            .unwrap_or_else(|| url.clone());
        let mut links = Vec::new();
        let mut seen = BTreeSet::new();
        for sel in follow {
            for element in html.select(sel) {
                let Some(href) = element.value().attr("href") else {
                    continue;
                };
                if let Some(link) = normalize(&base, href)
                    && seen.insert(link.clone())
                {
                    links.push(link);
                }
            }
        }
        let fields = kind.filter(|_| needs_fields).map(|k| {
            let mut map = Map::with_capacity(k.fields.len());
            for f in &k.fields {
                let mut values = html.select(&f.selector).map(|e| match &f.attr {
                    None => Value::String(collapse(e.text())),
                    Some(attr) => match e.value().attr(attr) {
                        None => Value::Null,
                        Some(v) if is_url_attr(attr) => Value::String(
                            base.join(v.trim())
                                .map_or_else(|_| v.to_string(), |u| u.to_string()),
                        ),
                        Some(v) => Value::String(v.to_string()),
                    },
                });
                let value = if f.all {
                    Value::Array(values.collect())
                } else {
                    values.next().unwrap_or(Value::Null)
                };
                map.insert(f.name.clone(), value);
            }
            map
        });
        Extracted {
            kind: kind.map(|k| k.name.clone()),
            fields,
            links,
        }
    }
}

fn is_url_attr(attr: &str) -> bool {
    matches!(attr, "href" | "src" | "action" | "data-src" | "poster")
}

/// Text pieces joined, with runs of whitespace as one space, trimmed.
fn collapse<'a>(pieces: impl Iterator<Item = &'a str>) -> String {
    let mut out = String::new();
    for piece in pieces {
        for word in piece.split_whitespace() {
            if !out.is_empty() && !out.ends_with(' ') {
                out.push(' ');
            }
            out.push_str(word);
        }
        if piece.ends_with(char::is_whitespace) && !out.is_empty() && !out.ends_with(' ') {
            out.push(' ');
        }
    }
    out.trim_end().to_string()
}

/// `href` resolved against `base`, as the frontier keys it: absolute,
/// http(s) only, without its fragment or an empty query. `None` for a link
/// that is not a page (`mailto:`, `javascript:`, unparsable).
pub fn normalize(base: &Url, href: &str) -> Option<String> {
    let href = href.trim();
    if href.is_empty() || href.starts_with('#') {
        return None;
    }
    let url = base.join(href).ok()?;
    normalize_url(url)
}

/// A parsed URL as the frontier keys it (see [`normalize`]).
pub fn normalize_url(mut url: Url) -> Option<String> {
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return None;
    }
    url.set_fragment(None);
    if url.query() == Some("") {
        url.set_query(None);
    }
    Some(url.into())
}

/// The site key of a URL: its host, with the port when it is not the
/// scheme's default (`127.0.0.1:8080`).
pub fn host_of(url: &Url) -> Option<String> {
    let host = url.host_str()?.to_ascii_lowercase();
    Some(match url.port() {
        Some(port) => format!("{host}:{port}"),
        None => host,
    })
}

/// The body as text: the charset of the `Content-Type`, else of a `<meta>`
/// in the first KiB, else UTF-8; bytes that do not decode become U+FFFD.
pub fn decode(body: &[u8], content_type: Option<&str>) -> String {
    let declared = content_type
        .and_then(charset_of)
        .or_else(|| meta_charset(&body[..body.len().min(1024)]));
    let encoding = declared
        .and_then(|label| encoding_rs::Encoding::for_label(label.as_bytes()))
        .unwrap_or(encoding_rs::UTF_8);
    let (text, _, _) = encoding.decode(body);
    text.into_owned()
}

fn charset_of(content_type: &str) -> Option<String> {
    content_type.split(';').skip(1).find_map(|p| {
        let (k, v) = p.split_once('=')?;
        k.trim()
            .eq_ignore_ascii_case("charset")
            .then(|| v.trim().trim_matches(['"', '\'']).to_string())
    })
}

fn meta_charset(head: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(head).to_ascii_lowercase();
    let at = text.find("charset=")? + "charset=".len();
    let rest = text[at..].trim_start_matches(['"', '\'']);
    let end = rest
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'))
        .unwrap_or(rest.len());
    (end > 0).then(|| rest[..end].to_string())
}

/// Whether a response is HTML: by its `Content-Type`, or, without one, by
/// its first bytes holding no NUL.
pub fn is_html(content_type: Option<&str>, body: &[u8]) -> bool {
    match content_type {
        Some(ct) => {
            let mime = ct
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase();
            mime == "text/html" || mime == "application/xhtml+xml"
        }
        None => !body[..body.len().min(512)].contains(&0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_are_absolute_without_fragments_and_only_http() {
        let base = Url::parse("http://Site.example:80/listings/2?x=1").expect("url");
        assert_eq!(
            normalize(&base, "../property/7#fotos").as_deref(),
            Some("http://site.example/property/7")
        );
        assert_eq!(
            normalize(&base, "/a?").as_deref(),
            Some("http://site.example/a")
        );
        assert_eq!(normalize(&base, "mailto:x@y.z"), None);
        assert_eq!(normalize(&base, "javascript:void(0)"), None);
        assert_eq!(normalize(&base, "#top"), None);
    }

    #[test]
    fn charsets_come_from_the_header_then_the_meta() {
        let latin1 = b"<h1>Almer\xeda</h1>";
        assert_eq!(
            decode(latin1, Some("text/html; charset=ISO-8859-1")),
            "<h1>Almería</h1>"
        );
        let meta = b"<meta charset=\"iso-8859-1\"><h1>Pe\xf1\xf3n</h1>";
        assert!(decode(meta, Some("text/html")).contains("Peñón"));
        assert!(decode(b"\xff\xfe\xfd", None).contains('\u{fffd}'));
    }
}
