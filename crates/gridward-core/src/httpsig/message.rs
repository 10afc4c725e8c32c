//! The request as signer and verifier see it, its components (RFC 9421 §2.1, §2.2), and the
//! signature base (§2.5).

use super::{HttpSigError, MAX_FIELD_VALUE_LEN};

/// A request as seen by signer or verifier.
///
/// Header field names are compared case-insensitively; a field that appears several times is
/// combined in order with `", "` after trimming each value's surrounding spaces and tabs
/// (RFC 9421 §2.1).
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// The method, e.g. `POST` (case-sensitive, as sent).
    pub method: &'a str,
    /// The absolute target URI, e.g. `https://127.0.0.1:8443/readings`: `http` or `https`, no
    /// user info, no fragment. A receiver rebuilds it from its scheme, the `Host` (or
    /// `:authority`) and the request target; it must equal what the sender signed.
    pub target_uri: &'a str,
    /// The header fields `(name, value)` in the order received or to be sent.
    pub headers: &'a [(&'a str, &'a str)],
}

impl Request<'_> {
    /// The value of field `name` (any case), combined over repeated fields as RFC 9421 §2.1
    /// says, or `None` if the request has no such field.
    ///
    /// Fails with [`HttpSigError::FieldTooLarge`] past [`MAX_FIELD_VALUE_LEN`] bytes.
    pub fn field_value(&self, name: &str) -> Result<Option<String>, HttpSigError> {
        let mut combined: Option<String> = None;
        for (field, value) in self.headers {
            if !field.eq_ignore_ascii_case(name) {
                continue;
            }
            let value = value.trim_matches([' ', '\t']);
            let out = match &mut combined {
                Some(out) => {
                    out.push_str(", ");
                    out
                }
                None => combined.insert(String::new()),
            };
            if out.len() + value.len() > MAX_FIELD_VALUE_LEN {
                return Err(HttpSigError::FieldTooLarge {
                    name: name.to_ascii_lowercase(),
                    len: out.len() + value.len(),
                });
            }
            out.push_str(value);
        }
        Ok(combined)
    }
}

/// A covered component Gridward supports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Component {
    Method,
    TargetUri,
    Authority,
    Scheme,
    RequestTarget,
    Path,
    Query,
    /// A header field, by its lowercase name.
    Field(String),
}

impl Component {
    /// Parses a component name as it appears (unquoted) in `Signature-Input`.
    ///
    /// Unknown derived components are [`HttpSigError::ComponentUnsupported`]; a field name that
    /// is not a lowercase token is [`HttpSigError::SignatureInputMalformed`].
    pub(super) fn parse(name: &str) -> Result<Self, HttpSigError> {
        Ok(match name {
            "@method" => Self::Method,
            "@target-uri" => Self::TargetUri,
            "@authority" => Self::Authority,
            "@scheme" => Self::Scheme,
            "@request-target" => Self::RequestTarget,
            "@path" => Self::Path,
            "@query" => Self::Query,
            derived if derived.starts_with('@') => {
                return Err(HttpSigError::ComponentUnsupported(format!("{derived:?}")));
            }
            field => {
                if field.is_empty()
                    || !field
                        .bytes()
                        .all(|b| is_tchar(b) && !b.is_ascii_uppercase())
                {
                    return Err(HttpSigError::SignatureInputMalformed(format!(
                        "component {field:?} is not a lowercase field name"
                    )));
                }
                Self::Field(field.to_owned())
            }
        })
    }

    pub(super) fn name(&self) -> &str {
        match self {
            Self::Method => "@method",
            Self::TargetUri => "@target-uri",
            Self::Authority => "@authority",
            Self::Scheme => "@scheme",
            Self::RequestTarget => "@request-target",
            Self::Path => "@path",
            Self::Query => "@query",
            Self::Field(name) => name,
        }
    }
}

/// `tchar` of RFC 9110 §5.6.2: the characters of a token (field names, methods).
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// The signature base (RFC 9421 §2.5): one line `"name": value` per component, then
/// `"@signature-params": ` and the serialized parameters, without a final newline.
pub(super) fn signature_base(
    req: &Request<'_>,
    components: &[Component],
    signature_params: &str,
) -> Result<String, HttpSigError> {
    let mut target: Option<Target<'_>> = None;
    let mut base = String::new();
    for component in components {
        let value = match component {
            Component::Field(name) => field_component(req, name)?,
            Component::Method => {
                if req.method.is_empty() || !req.method.bytes().all(is_tchar) {
                    return Err(HttpSigError::InvalidRequest(format!(
                        "method {:?} is not a token",
                        req.method
                    )));
                }
                req.method.to_owned()
            }
            derived => {
                let target = match &mut target {
                    Some(t) => t,
                    None => target.insert(Target::parse(req.target_uri)?),
                };
                match derived {
                    Component::TargetUri => target.target_uri(),
                    Component::Authority => target.authority(),
                    Component::Scheme => target.scheme.to_ascii_lowercase(),
                    Component::RequestTarget => target.request_target(),
                    Component::Path => target.path().to_owned(),
                    _ => target.query(),
                }
            }
        };
        base.push('"');
        base.push_str(component.name());
        base.push_str("\": ");
        base.push_str(&value);
        base.push('\n');
    }
    base.push_str("\"@signature-params\": ");
    base.push_str(signature_params);
    Ok(base)
}

/// A covered header field's value: present, and only visible ASCII, spaces and tabs, so it
/// cannot add lines to the signature base.
fn field_component(req: &Request<'_>, name: &str) -> Result<String, HttpSigError> {
    let value = req
        .field_value(name)?
        .ok_or_else(|| HttpSigError::ComponentMissing(name.to_owned()))?;
    if !value
        .bytes()
        .all(|b| b == b'\t' || (b' '..=b'~').contains(&b))
    {
        return Err(HttpSigError::FieldValueInvalid(name.to_owned()));
    }
    Ok(value)
}

/// An absolute `http`/`https` target URI, split into the parts RFC 9421 §2.2 derives from.
#[derive(Debug)]
struct Target<'a> {
    scheme: &'a str,
    /// `host[:port]` as written (user info is refused).
    authority: &'a str,
    host: &'a str,
    port: Option<&'a str>,
    default_port: &'static str,
    /// Possibly empty.
    path: &'a str,
    query: Option<&'a str>,
}

impl<'a> Target<'a> {
    fn parse(uri: &'a str) -> Result<Self, HttpSigError> {
        let invalid = |m: &str| HttpSigError::InvalidRequest(format!("target URI {uri:?}: {m}"));
        if uri.len() > MAX_FIELD_VALUE_LEN {
            return Err(HttpSigError::FieldTooLarge {
                name: "@target-uri".to_owned(),
                len: uri.len(),
            });
        }
        if !uri.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(invalid("only visible ASCII characters are allowed"));
        }
        if uri.contains('#') {
            return Err(invalid("a fragment is not part of a target URI"));
        }
        let (scheme, rest) = uri
            .split_once("://")
            .ok_or_else(|| invalid("not an absolute URI"))?;
        let default_port = if scheme.eq_ignore_ascii_case("https") {
            "443"
        } else if scheme.eq_ignore_ascii_case("http") {
            "80"
        } else {
            return Err(invalid("the scheme must be http or https"));
        };
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, tail) = rest
            .split_at_checked(end)
            .ok_or_else(|| invalid("bad authority"))?;
        if authority.contains('@') {
            return Err(invalid("user info is not allowed"));
        }
        let (host, port) = if authority.starts_with('[') {
            let close = authority
                .find(']')
                .ok_or_else(|| invalid("unterminated IP literal"))?;
            let (host, after) = authority
                .split_at_checked(close + 1)
                .ok_or_else(|| invalid("bad IP literal"))?;
            let literal_ok = host
                .get(1..host.len().saturating_sub(1))
                .is_some_and(|inner| {
                    !inner.is_empty()
                        && inner
                            .bytes()
                            .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
                });
            if !literal_ok {
                return Err(invalid("bad IP literal"));
            }
            match after.strip_prefix(':') {
                Some(port) => (host, Some(port)),
                None if after.is_empty() => (host, None),
                None => return Err(invalid("bad authority")),
            }
        } else {
            match authority.split_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            }
        };
        let host_ok = !host.is_empty()
            && (host.starts_with('[')
                || host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._~%!$&'()*+,;=".contains(&b)));
        if !host_ok {
            return Err(invalid("bad host"));
        }
        if let Some(port) = port
            && (port.is_empty() || port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()))
        {
            return Err(invalid("bad port"));
        }
        let (path, query) = match tail.split_once('?') {
            Some((path, query)) => (path, Some(query)),
            None => (tail, None),
        };
        Ok(Self {
            scheme,
            authority,
            host,
            port,
            default_port,
            path,
            query,
        })
    }

    /// `@target-uri`: the URI with an empty path written as `/`.
    fn target_uri(&self) -> String {
        let mut out = format!("{}://{}{}", self.scheme, self.authority, self.path());
        if let Some(query) = self.query {
            out.push('?');
            out.push_str(query);
        }
        out
    }

    /// `@authority`: host lowercase, the scheme's default port omitted (RFC 9110 §4.2.3).
    fn authority(&self) -> String {
        let host = self.host.to_ascii_lowercase();
        match self.port {
            Some(port) if port.trim_start_matches('0') != self.default_port => {
                format!("{host}:{port}")
            }
            _ => host,
        }
    }

    /// `@path`: never empty.
    fn path(&self) -> &str {
        if self.path.is_empty() { "/" } else { self.path }
    }

    /// `@query`: `?` and the query, or `?` alone without one.
    fn query(&self) -> String {
        format!("?{}", self.query.unwrap_or_default())
    }

    /// `@request-target`: the origin form, path and query.
    fn request_target(&self) -> String {
        match self.query {
            Some(query) => format!("{}?{query}", self.path()),
            None => self.path().to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn derived(uri: &str, component: &str) -> Result<String, HttpSigError> {
        let req = Request {
            method: "GET",
            target_uri: uri,
            headers: &[],
        };
        let c = Component::parse(component)?;
        let base = signature_base(&req, &[c], "()")?;
        let line = base.lines().next().unwrap_or_default();
        Ok(line
            .split_once(": ")
            .map(|(_, v)| v.to_owned())
            .unwrap_or_default())
    }

    #[test]
    fn derived_components_follow_rfc9421_section_2_2() {
        // RFC 9421 §2.2.2 to §2.2.7 examples (https://www.example.com/path?param=value).
        let uri = "https://www.example.com/path?param=value";
        assert_eq!(derived(uri, "@target-uri").unwrap(), uri);
        assert_eq!(derived(uri, "@authority").unwrap(), "www.example.com");
        assert_eq!(derived(uri, "@scheme").unwrap(), "https");
        assert_eq!(
            derived(uri, "@request-target").unwrap(),
            "/path?param=value"
        );
        assert_eq!(derived(uri, "@path").unwrap(), "/path");
        assert_eq!(derived(uri, "@query").unwrap(), "?param=value");
        assert_eq!(derived(uri, "@method").unwrap(), "GET");
        // §2.2.7: no query is "?", an empty query is "?" too.
        assert_eq!(derived("https://x.example/p", "@query").unwrap(), "?");
        assert_eq!(derived("https://x.example/p?", "@query").unwrap(), "?");
    }

    #[test]
    fn authority_and_path_are_normalised() {
        assert_eq!(
            derived("HTTPS://WWW.Example.COM:443", "@authority").unwrap(),
            "www.example.com"
        );
        assert_eq!(
            derived("http://Example.com:80/", "@authority").unwrap(),
            "example.com"
        );
        assert_eq!(
            derived("http://example.com:443/", "@authority").unwrap(),
            "example.com:443"
        );
        assert_eq!(
            derived("https://127.0.0.1:8443/readings", "@authority").unwrap(),
            "127.0.0.1:8443"
        );
        assert_eq!(
            derived("https://[::1]:8443/x", "@authority").unwrap(),
            "[::1]:8443"
        );
        assert_eq!(derived("HTTPS://h.example", "@scheme").unwrap(), "https");
        assert_eq!(derived("https://h.example", "@path").unwrap(), "/");
        assert_eq!(
            derived("https://h.example?a=b", "@target-uri").unwrap(),
            "https://h.example/?a=b"
        );
        assert_eq!(
            derived("https://h.example?a=b", "@request-target").unwrap(),
            "/?a=b"
        );
    }

    #[test]
    fn bad_target_uris_are_refused() {
        for uri in [
            "",
            "/readings",
            "ftp://h.example/x",
            "https://",
            "https:///x",
            "https://user@h.example/x",
            "https://h.example/x#frag",
            "https://h.example/a b",
            "https://h.example:/x",
            "https://h.example:99999999/x",
            "https://h.example:ab/x",
            "https://[::1/x",
            "https://[zz]/x",
            "https://h.example/\u{e9}",
            "https://h\"x/",
        ] {
            assert!(
                matches!(
                    derived(uri, "@target-uri"),
                    Err(HttpSigError::InvalidRequest(_))
                ),
                "{uri:?} should be refused"
            );
        }
        let long = format!("https://h.example/{}", "a".repeat(MAX_FIELD_VALUE_LEN));
        assert!(matches!(
            derived(&long, "@path"),
            Err(HttpSigError::FieldTooLarge { .. })
        ));
    }

    #[test]
    fn bad_methods_are_refused() {
        for method in ["", "GET /", "P\u{f6}ST", "GET\n"] {
            let req = Request {
                method,
                target_uri: "https://h.example/",
                headers: &[],
            };
            assert!(matches!(
                signature_base(&req, &[Component::Method], "()"),
                Err(HttpSigError::InvalidRequest(_))
            ));
        }
    }

    #[test]
    fn repeated_fields_are_combined_case_insensitively() {
        let headers = [
            ("X-Multi", " a "),
            ("content-type", "text/plain"),
            ("x-multi", "\tb, c"),
            ("X-MULTI", ""),
        ];
        let req = Request {
            method: "GET",
            target_uri: "https://h.example/",
            headers: &headers,
        };
        assert_eq!(
            req.field_value("x-multi").unwrap().as_deref(),
            Some("a, b, c, ")
        );
        assert_eq!(
            req.field_value("Content-Type").unwrap().as_deref(),
            Some("text/plain")
        );
        assert_eq!(req.field_value("absent").unwrap(), None);
    }

    #[test]
    fn oversized_and_control_character_fields_are_refused() {
        let big = "a".repeat(MAX_FIELD_VALUE_LEN / 2 + 1);
        let headers = [("x-big", big.as_str()), ("x-big", big.as_str())];
        let req = Request {
            method: "GET",
            target_uri: "https://h.example/",
            headers: &headers,
        };
        assert!(matches!(
            req.field_value("x-big"),
            Err(HttpSigError::FieldTooLarge { .. })
        ));
        for value in ["a\nb", "a\rb", "a\u{0}b", "caf\u{e9}", "a\u{7f}"] {
            let headers = [("x-bad", value)];
            let req = Request {
                method: "GET",
                target_uri: "https://h.example/",
                headers: &headers,
            };
            assert_eq!(
                signature_base(&req, &[Component::Field("x-bad".into())], "()"),
                Err(HttpSigError::FieldValueInvalid("x-bad".into()))
            );
        }
    }

    #[test]
    fn component_names_are_checked() {
        for bad in ["Content-Type", "", "a b", "a\"b", "caf\u{e9}"] {
            assert!(matches!(
                Component::parse(bad),
                Err(HttpSigError::SignatureInputMalformed(_))
            ));
        }
        for unsupported in ["@status", "@query-param", "@signature-params", "@foo", "@"] {
            assert!(matches!(
                Component::parse(unsupported),
                Err(HttpSigError::ComponentUnsupported(_))
            ));
        }
        assert_eq!(
            Component::parse("content-digest").unwrap(),
            Component::Field("content-digest".into())
        );
    }
}
