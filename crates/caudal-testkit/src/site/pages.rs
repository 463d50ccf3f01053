//! What the fixture [`Site`](super::Site) serves: the generated real-estate
//! pages and the special pages for extraction and fault tests.
//!
//! Everything here is a pure function of the [`SiteOptions`](super::SiteOptions),
//! the server's own host and, for detail pages, the page's version, so a test
//! computes what a crawler should have extracted with [`detail`] instead of
//! parsing the page itself. The large pieces (the description that pads detail
//! pages, the body of `/huge`, the sitemaps) are built once per site and
//! shared by every response, which keeps the server fast enough for the
//! crawler benchmark.

use std::fmt::Write as _;
use std::io::Write as _;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use flate2::Compression;
use flate2::write::GzEncoder;

/// The size of `/huge`, in bytes.
pub const HUGE_BYTES: usize = 20 * 1024 * 1024;

/// The size of `/garbage`, in bytes.
pub const GARBAGE_BYTES: usize = 64 * 1024;

/// The `<h1 class="title">` text of `/latin1` and `/latin1-meta`, as a test
/// expects to read it after decoding ISO-8859-1.
pub const LATIN1_TITLE: &str = "Casa en Almería, Peñón";

/// What the title of a detail page gets appended once
/// [`Site::touch`](super::Site::touch) changed it.
pub const UPDATED_SUFFIX: &str = " (actualizada)";

/// The cities detail pages are in, chosen by `id % 8`.
const CITIES: [&str; 8] = [
    "Ciudad de México",
    "Guadalajara",
    "Monterrey",
    "Puebla",
    "Querétaro",
    "Mérida",
    "León",
    "Oaxaca",
];

/// The text that pads detail pages, cycled through paragraph by paragraph.
const SENTENCES: [&str; 12] = [
    "Amplia casa con jardín al frente y cochera techada para dos autos.",
    "La cocina integral tiene barra de granito y acceso directo al patio de servicio.",
    "Sala y comedor con doble altura, piso de mármol y grandes ventanales.",
    "La recámara principal cuenta con vestidor, baño completo y balcón con vista a la montaña.",
    "Ubicada a dos cuadras del parque, cerca de escuelas, hospitales y centros comerciales.",
    "El fraccionamiento tiene vigilancia las veinticuatro horas, alberca y áreas verdes.",
    "Acabados de primera: cancelería de aluminio, puertas de cedro y clósets de madera.",
    "Cuenta con cuarto de servicio con baño, bodega y calentador solar.",
    "Ideal para familias que buscan tranquilidad sin alejarse de la ciudad.",
    "La terraza en la azotea es perfecta para reuniones los fines de semana.",
    "Se aceptan créditos bancarios, Infonavit y Fovissste.",
    "Escrituras en orden y lista para habitarse de inmediato.",
];

/// Sentences per paragraph of the padding.
const SENTENCES_PER_PARAGRAPH: usize = 5;

/// The size of the shared chunk `/huge` is streamed in.
const HUGE_CHUNK: usize = 64 * 1024;

/// What one detail page (`/property/{id}`) shows, as a crawler should extract
/// it: the text of each element exactly as it appears in the page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Detail {
    /// The detail id, `1..=listings × per_listing`.
    pub id: u64,
    /// The text of `h1.title`: `"Casa {id} en {city}"`, followed by
    /// [`UPDATED_SUFFIX`] once the page was touched.
    pub title: String,
    /// The city named in the title, one of eight Mexican cities.
    pub city: String,
    /// The text of `span.price`, e.g. `"$ 1,234,000"`.
    pub price: String,
    /// The texts of `ul.features li`, in order: `"{n} recámaras"`,
    /// `"{n} baños"`, `"{n} m²"`.
    pub features: Vec<String>,
    /// The `src` of `img.main`: `"/img/{id}.jpg"`.
    pub image: String,
}

/// What detail page `id` shows before any [`Site::touch`](super::Site::touch).
///
/// Deterministic: the same id always gives the same detail, whatever the
/// site's options.
pub fn detail(id: u64) -> Detail {
    detail_at(id, 0)
}

/// What detail page `id` shows at `version` (the number of times it was
/// [touched](super::Site::touch)); only the title changes.
pub fn detail_at(id: u64, version: u32) -> Detail {
    let facts = Facts::of(id);
    let mut title = String::new();
    facts.write_title(&mut title, version);
    let mut price = String::new();
    write_price(&mut price, facts.price);
    Detail {
        id,
        title,
        city: facts.city.to_owned(),
        price,
        features: vec![
            format!("{} recámaras", facts.bedrooms),
            format!("{} baños", facts.bathrooms),
            format!("{} m²", facts.m2),
        ],
        image: format!("/img/{id}.jpg"),
    }
}

/// The generated facts of one detail, without allocating, so listing pages
/// can show prices cheaply.
struct Facts {
    id: u64,
    city: &'static str,
    price: u64,
    bedrooms: u64,
    bathrooms: u64,
    m2: u64,
}

impl Facts {
    fn of(id: u64) -> Self {
        let h = mix(id);
        Self {
            id,
            city: CITIES[(id % CITIES.len() as u64) as usize],
            price: (800 + h % 9_200) * 1_000,
            bedrooms: 1 + (h >> 20) % 5,
            bathrooms: 1 + (h >> 28) % 3,
            m2: 60 + (h >> 36) % 340,
        }
    }

    fn write_title(&self, out: &mut String, version: u32) {
        let _ = write!(out, "Casa {} en {}", self.id, self.city);
        if version > 0 {
            out.push_str(UPDATED_SUFFIX);
        }
    }
}

/// The site's content, built once when the site starts.
pub(crate) struct Pages {
    listings: u32,
    per_listing: u32,
    host: String,
    /// The `<p>…</p>` paragraphs inside every detail page's description.
    description: String,
    robots: Option<Bytes>,
    huge: Arc<[Bytes]>,
    pdf: Bytes,
    garbage: Bytes,
    sitemap_index: Bytes,
    sitemap_listings: OnceLock<Bytes>,
    sitemap_details: OnceLock<Bytes>,
}

impl Pages {
    pub(crate) fn new(
        listings: u32,
        per_listing: u32,
        detail_bytes: usize,
        robots: Option<&str>,
        host: String,
    ) -> Self {
        let mut pages = Self {
            listings,
            per_listing,
            sitemap_index: sitemap_index(&host),
            host,
            description: String::new(),
            robots: robots.map(|r| Bytes::copy_from_slice(r.as_bytes())),
            huge: huge_parts(),
            pdf: pdf(),
            garbage: garbage(),
            sitemap_listings: OnceLock::new(),
            sitemap_details: OnceLock::new(),
        };
        // Pad so that a typical page (id 1, untouched) is `detail_bytes` long;
        // other ids differ by the few bytes of their numbers.
        let frame = pages.detail_page(1, 0).len();
        pages.description = description(detail_bytes.saturating_sub(frame));
        pages
    }

    /// How many detail pages the site has.
    pub(crate) fn total_details(&self) -> u64 {
        u64::from(self.listings) * u64::from(self.per_listing)
    }

    /// The listing page that links to detail `id`.
    pub(crate) fn listing_of(&self, id: u64) -> u32 {
        let per_listing = u64::from(self.per_listing.max(1));
        u32::try_from((id.max(1) - 1) / per_listing + 1).unwrap_or(u32::MAX)
    }

    pub(crate) fn robots(&self) -> Option<Bytes> {
        self.robots.clone()
    }

    /// `/listings/{n}`, or `None` when there is no such page.
    pub(crate) fn listing_page(&self, n: u32) -> Option<String> {
        if n == 0 || n > self.listings {
            return None;
        }
        let first = u64::from(n - 1) * u64::from(self.per_listing) + 1;
        let ids = first..first + u64::from(self.per_listing);
        let mut html = String::with_capacity(256 + 160 * (self.per_listing as usize + 1));
        let _ = write!(
            html,
            "<!doctype html><html><head><title>Listados página {n}</title></head><body>\n\
             <ul class=\"results\">\n"
        );
        for id in ids.clone() {
            self.write_card(&mut html, id);
        }
        // The first card once more: a duplicate link a crawler must fetch once.
        if !ids.is_empty() {
            self.write_card(&mut html, first);
        }
        html.push_str("</ul>\n");
        if n < self.listings {
            let _ = writeln!(
                html,
                "<a class=\"next\" href=\"/listings/{}\">Siguiente</a>",
                n + 1
            );
        }
        html.push_str("</body></html>\n");
        Some(html)
    }

    fn write_card(&self, html: &mut String, id: u64) {
        html.push_str("  <li class=\"card\"><a class=\"detail\" href=\"");
        self.write_detail_link(html, id);
        let _ = write!(html, "\">Casa {id}</a> <span class=\"price\">");
        write_price(html, Facts::of(id).price);
        html.push_str("</span></li>\n");
    }

    /// The `href` a listing page uses for detail `id`; the forms vary on
    /// purpose so that crawlers must normalise them.
    fn write_detail_link(&self, html: &mut String, id: u64) {
        let _ = match id % 4 {
            0 => write!(html, "/property/{id}"),
            1 => write!(html, "../property/{id}"),
            2 => write!(html, "http://{}/property/{id}#fotos", self.host),
            _ => write!(html, "/property/{id}#mapa"),
        };
    }

    /// `/property/{id}` at `version`; the caller checks that `id` exists.
    pub(crate) fn detail_page(&self, id: u64, version: u32) -> String {
        let facts = Facts::of(id);
        let mut html = String::with_capacity(1024 + self.description.len());
        html.push_str("<!doctype html><html><head><title>");
        let _ = write!(html, "Casa {id}");
        if version > 0 {
            html.push_str(UPDATED_SUFFIX);
        }
        html.push_str("</title></head><body>\n<h1 class=\"title\">");
        facts.write_title(&mut html, version);
        html.push_str("</h1>\n<span class=\"price\" data-currency=\"MXN\">");
        write_price(&mut html, facts.price);
        let _ = write!(
            html,
            "</span>\n<ul class=\"features\"><li>{} recámaras</li><li>{} baños</li>\
             <li>{} m²</li></ul>\n<img class=\"main\" src=\"/img/{id}.jpg\">\n\
             <a class=\"back\" href=\"/listings/{}\">Volver</a>\n<div class=\"description\">",
            facts.bedrooms,
            facts.bathrooms,
            facts.m2,
            self.listing_of(id),
        );
        html.push_str(&self.description);
        html.push_str("</div>\n</body></html>\n");
        html
    }

    /// The pieces `/huge` is streamed from, in order; most are the same
    /// shared chunk.
    pub(crate) fn huge(&self) -> Arc<[Bytes]> {
        Arc::clone(&self.huge)
    }

    pub(crate) fn pdf(&self) -> Bytes {
        self.pdf.clone()
    }

    pub(crate) fn garbage(&self) -> Bytes {
        self.garbage.clone()
    }

    pub(crate) fn sitemap_index(&self) -> Bytes {
        self.sitemap_index.clone()
    }

    /// `<urlset>` of every listing page.
    pub(crate) fn sitemap_listings(&self) -> Bytes {
        self.sitemap_listings
            .get_or_init(|| {
                let paths = (1..=self.listings).map(|n| format!("/listings/{n}"));
                Bytes::from(urlset(&self.host, paths))
            })
            .clone()
    }

    /// Gzip-compressed `<urlset>` of every detail page.
    pub(crate) fn sitemap_details_gz(&self) -> Bytes {
        self.sitemap_details
            .get_or_init(|| {
                let paths = (1..=self.total_details()).map(|id| format!("/property/{id}"));
                let xml = urlset(&self.host, paths);
                let mut gz = GzEncoder::new(Vec::new(), Compression::default());
                gz.write_all(xml.as_bytes())
                    .expect("caudal-testkit: gzip into memory cannot fail");
                Bytes::from(
                    gz.finish()
                        .expect("caudal-testkit: gzip into memory cannot fail"),
                )
            })
            .clone()
    }
}

/// `/malformed`: broken HTML whose title, price and link a forgiving HTML5
/// parser still finds.
pub(crate) const MALFORMED: &str = "<!doctype html>
<html><head><title>Mal formado</title>
<body>
<div class=wrapper id=principal>
<p>Texto sin cerrar
<p>Otro párrafo con <b>negrita <i>y cursiva</b></i>
</div></div></section>
<h1 class=\"title\">Mal formado</h1>
<span class=\"price\">$ 1</span>
<ul class=features><li>uno<li>dos<li>tres
</ul>
<a class=detail href=/property/1>Casa 1</a>
<img src=/img/1.jpg alt=foto>
<div class=pie><p>Sin cierre
";

/// `/private/…`: a page robots.txt usually disallows.
pub(crate) const PRIVATE: &str = "<!doctype html><html><head><title>Privado</title></head><body>\n\
<h1 class=\"title\">Área privada</h1>\n</body></html>\n";

/// `/slow`, once it answers.
pub(crate) const SLOW: &str = "<!doctype html><html><head><title>Lenta</title></head><body>\n\
<h1 class=\"title\">Página lenta</h1>\n</body></html>\n";

/// The body of every 404.
pub(crate) const NOT_FOUND: &str = "<!doctype html><html><head><title>No encontrada</title></head>\
<body><h1>404 No encontrada</h1></body></html>\n";

/// `/img/{id}.jpg`: the start and end markers of a JPEG, nothing between.
pub(crate) const JPEG: &[u8] = &[
    0xFF, 0xD8, 0xFF, 0xE0, 0x00, 0x10, b'J', b'F', b'I', b'F', 0x00, 0x01, 0x01, 0x00, 0x00, 0x01,
    0x00, 0x01, 0x00, 0x00, 0xFF, 0xD9,
];

/// `/latin1` (without the `<meta>`) and `/latin1-meta` (with it), encoded
/// in ISO-8859-1.
pub(crate) fn latin1(with_meta: bool) -> Bytes {
    let meta = if with_meta {
        "<meta charset=\"iso-8859-1\">"
    } else {
        ""
    };
    let html = format!(
        "<!doctype html><html><head>{meta}<title>Casa en Almería</title></head><body>\n\
         <h1 class=\"title\">{LATIN1_TITLE}</h1>\n\
         <span class=\"price\">$ 2,450,000</span>\n\
         <div class=\"description\"><p>Ubicación céntrica, baño con ducha, cocina equipada \
         y jardín. Año de construcción: 1998.</p></div>\n</body></html>\n"
    );
    html.chars()
        .map(|c| u8::try_from(u32::from(c)).expect("caudal-testkit: /latin1 text is Latin-1"))
        .collect::<Vec<u8>>()
        .into()
}

/// The paragraphs that pad a detail page's description to about `target`
/// bytes: whole sentences, the last paragraph cut at a word.
fn description(target: usize) -> String {
    let mut out = String::with_capacity(target + 64);
    let mut paragraph = 0;
    // A paragraph starts only when a few words fit in it.
    'paragraphs: while out.len() + 16 <= target {
        out.push_str("<p>");
        for k in 0..SENTENCES_PER_PARAGRAPH {
            let sentence = SENTENCES[(paragraph * 7 + k) % SENTENCES.len()];
            if k > 0 {
                out.push(' ');
            }
            if out.len() + sentence.len() + "</p>".len() > target {
                for word in sentence.split(' ') {
                    if out.len() + word.len() + 1 + "</p>".len() > target {
                        break;
                    }
                    out.push_str(word);
                    out.push(' ');
                }
                if out.ends_with(' ') {
                    out.pop();
                }
                out.push_str("</p>");
                break 'paragraphs;
            }
            out.push_str(sentence);
        }
        out.push_str("</p>");
        paragraph += 1;
    }
    out
}

/// `/huge` as a head, the same ASCII chunk again and again, and a tail,
/// exactly [`HUGE_BYTES`] long.
fn huge_parts() -> Arc<[Bytes]> {
    let head = Bytes::from_static(
        b"<!doctype html><html><head><title>Pagina enorme</title></head><body>\n\
          <h1 class=\"title\">Pagina enorme</h1>\n<div class=\"description\">\n",
    );
    let tail = Bytes::from_static(b"\n</div>\n</body></html>\n");
    let paragraph = "<p>Texto de relleno para una pagina enorme que un crawler debe \
                     rechazar o cortar antes de leerla completa.</p>\n";
    let mut chunk = paragraph.repeat(HUGE_CHUNK / paragraph.len() + 1);
    chunk.truncate(HUGE_CHUNK);
    let chunk = Bytes::from(chunk);

    let middle = HUGE_BYTES - head.len() - tail.len();
    let mut parts = Vec::with_capacity(middle / HUGE_CHUNK + 3);
    parts.push(head);
    parts.extend(std::iter::repeat_n(chunk.clone(), middle / HUGE_CHUNK));
    parts.push(chunk.slice(..middle % HUGE_CHUNK));
    parts.push(tail);
    parts.into()
}

/// `/file.pdf`: a PDF header, a few KB of binary bytes with NULs, a trailer.
fn pdf() -> Bytes {
    let mut pdf = b"%PDF-1.4\n%\xE2\xE3\xCF\xD3\n1 0 obj\n<< /Length 4096 >>\nstream\n".to_vec();
    let mut state = 0x00DF_0001_u64;
    for i in 0..4096_u32 {
        pdf.push(if i.is_multiple_of(16) {
            0
        } else {
            next_byte(&mut state)
        });
    }
    pdf.extend_from_slice(b"\nendstream\nendobj\ntrailer\n<< /Root 1 0 R >>\n%%EOF\n");
    pdf.into()
}

/// `/garbage`: [`GARBAGE_BYTES`] pseudo-random bytes from a fixed seed,
/// starting with a byte that never occurs in UTF-8.
fn garbage() -> Bytes {
    let mut state = 0x5EED_u64;
    let mut bytes: Vec<u8> = (0..GARBAGE_BYTES).map(|_| next_byte(&mut state)).collect();
    bytes[0] = 0xFF;
    bytes.into()
}

fn sitemap_index(host: &str) -> Bytes {
    Bytes::from(format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\
         <sitemapindex xmlns=\"http://www.sitemaps.org/schemas/sitemap/0.9\">\n\
         <sitemap><loc>http://{host}/sitemap-listings.xml</loc></sitemap>\n\
         <sitemap><loc>http://{host}/sitemap-details.xml.gz</loc></sitemap>\n\
         </sitemapindex>\n"
    ))
}

fn urlset(host: &str, paths: impl Iterator<Item = String>) -> String {
    let mut xml = String::from(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\
         <urlset xmlns=\"http://www.sitemaps.org/schemas/sitemap/0.9\">\n",
    );
    for path in paths {
        let _ = writeln!(xml, "<url><loc>http://{host}{path}</loc></url>");
    }
    xml.push_str("</urlset>\n");
    xml
}

/// Writes `$ 1,234,000`.
fn write_price(out: &mut String, price: u64) {
    out.push_str("$ ");
    let digits = price.to_string();
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(digit);
    }
}

/// SplitMix64: spreads consecutive ids over all bits.
fn mix(id: u64) -> u64 {
    let mut z = id.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The next byte of an xorshift64 stream.
fn next_byte(state: &mut u64) -> u8 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    (*state >> 24) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prices_are_grouped_by_thousands() {
        let mut out = String::new();
        write_price(&mut out, 1_234_000);
        assert_eq!(out, "$ 1,234,000");
        out.clear();
        write_price(&mut out, 800_000);
        assert_eq!(out, "$ 800,000");
    }

    #[test]
    fn description_stays_within_its_target() {
        for target in [0, 10, 500, 30_000] {
            let text = description(target);
            assert!(text.len() <= target, "{target}: {}", text.len());
            assert!(text.len() + 120 >= target, "{target}: {}", text.len());
        }
    }

    #[test]
    fn huge_is_exactly_its_size() {
        let total: usize = huge_parts().iter().map(Bytes::len).sum();
        assert_eq!(total, HUGE_BYTES);
    }
}
