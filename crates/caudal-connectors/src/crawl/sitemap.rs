//! Sitemaps: `<urlset>` files (URLs to crawl) and `<sitemapindex>` files
//! (more sitemaps), plain or gzip-compressed (by their first bytes, whatever
//! the headers say).
//!
//! Promises: a sitemap that is not XML, or not one of the two, is an error
//! naming the URL; a compressed one is never inflated past the size limit.

use std::io::Read as _;

use quick_xml::Reader;
use quick_xml::events::Event;

/// The largest sitemap read, compressed or not (the protocol's 50 MB).
pub const MAX_SITEMAP_BYTES: u64 = 50 << 20;

/// What a sitemap lists.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Sitemap {
    /// Pages.
    Urls(Vec<String>),
    /// Further sitemaps.
    Index(Vec<String>),
}

/// Parses a sitemap's body.
pub fn parse(body: &[u8]) -> Result<Sitemap, String> {
    let inflated;
    let xml: &[u8] = if body.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(body)
            .take(MAX_SITEMAP_BYTES + 1)
            .read_to_end(&mut out)
            .map_err(|e| format!("not a valid gzip file: {e}"))?;
        if out.len() as u64 > MAX_SITEMAP_BYTES {
            return Err(format!(
                "larger than {MAX_SITEMAP_BYTES} bytes once inflated"
            ));
        }
        inflated = out;
        &inflated
    } else {
        body
    };
    let mut reader = Reader::from_reader(xml);
    reader.config_mut().trim_text(true);
    let mut buf = Vec::new();
    let mut root: Option<String> = None;
    let mut loc: Option<String> = None;
    let mut locs = Vec::new();
    loop {
        match reader.read_event_into(&mut buf) {
            Ok(Event::Start(e)) => {
                let name = e.local_name().as_ref().to_owned();
                if root.is_none() {
                    root = Some(name.clone());
                }
                if name == "loc" {
                    loc = Some(String::new());
                }
            }
            Ok(Event::Text(t)) => {
                if let Some(l) = loc.as_mut() {
                    l.push_str(&t);
                }
            }
            Ok(Event::CData(t)) => {
                if let Some(l) = loc.as_mut() {
                    l.push_str(&t);
                }
            }
            Ok(Event::GeneralRef(r)) => {
                if let Some(l) = loc.as_mut() {
                    let entity = format!("&{};", &*r);
                    let text = quick_xml::escape::unescape(&entity)
                        .map_err(|e| format!("not valid XML text: {e}"))?;
                    l.push_str(&text);
                }
            }
            Ok(Event::End(_)) => {
                if let Some(l) = loc.take() {
                    locs.push(l.trim().to_string());
                }
            }
            Ok(Event::Eof) => break,
            Err(e) => {
                return Err(format!(
                    "not valid XML at byte {}: {e}",
                    reader.buffer_position()
                ));
            }
            Ok(_) => {}
        }
        buf.clear();
    }
    match root.as_deref() {
        Some("urlset") => Ok(Sitemap::Urls(locs)),
        Some("sitemapindex") => Ok(Sitemap::Index(locs)),
        Some(other) => Err(format!(
            "not a sitemap: its root element is <{other}>, not <urlset> or <sitemapindex>"
        )),
        None => Err("not a sitemap: it is empty".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    #[test]
    fn urlsets_indexes_and_gzip() {
        let set = br#"<?xml version="1.0"?><urlset xmlns="http://www.sitemaps.org/schemas/sitemap/0.9">
            <url><loc>http://a.example/1?x=1&amp;y=2</loc></url><url><loc> http://a.example/2 </loc></url></urlset>"#;
        assert_eq!(
            parse(set),
            Ok(Sitemap::Urls(vec![
                "http://a.example/1?x=1&y=2".into(),
                "http://a.example/2".into()
            ]))
        );
        let index = br#"<sitemapindex><sitemap><loc>http://a.example/s1.xml.gz</loc></sitemap></sitemapindex>"#;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(index).expect("gzip");
        let gz = gz.finish().expect("gzip");
        assert_eq!(
            parse(&gz),
            Ok(Sitemap::Index(vec!["http://a.example/s1.xml.gz".into()]))
        );
        assert!(parse(b"<html></html>").is_err());
        assert!(parse(b"\x1f\x8bnot gzip").is_err());
        assert!(parse(b"<urlset><url><loc>x</url>").is_err());
    }
}
