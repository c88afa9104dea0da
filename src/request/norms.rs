//! Test oracle: the path normalisations back-ends apply (decoding, RFC 3986
//! dot removal, slash merging, `\` as `/`, servlet `;params`, lower-casing),
//! written independently of `path.rs`. The deny-prefix and workspace
//! proptests both ask "where could a back-end land with this path?".

/// One back-end normalisation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Norm {
    DecodeOnce,
    DecodeAll,
    RemoveDots,
    MergeSlashes,
    Backslash,
    StripParams,
    Lower,
}

impl Norm {
    pub const ALL: [Norm; 7] = [
        Norm::DecodeOnce,
        Norm::DecodeAll,
        Norm::RemoveDots,
        Norm::MergeSlashes,
        Norm::Backslash,
        Norm::StripParams,
        Norm::Lower,
    ];

    pub fn apply(self, p: &[u8]) -> Vec<u8> {
        match self {
            Norm::DecodeOnce => decode_once(p),
            Norm::DecodeAll => decode_all(p),
            Norm::RemoveDots => remove_dots(p),
            Norm::MergeSlashes => {
                let mut out = Vec::with_capacity(p.len());
                for &c in p {
                    if !(c == b'/' && out.last() == Some(&b'/')) {
                        out.push(c);
                    }
                }
                out
            }
            Norm::Backslash => p
                .iter()
                .map(|&c| if c == b'\\' { b'/' } else { c })
                .collect(),
            Norm::StripParams => {
                // Servlet-style: `;…` up to the next `/` is dropped from each segment.
                let mut out = Vec::with_capacity(p.len());
                let mut skipping = false;
                for &c in p {
                    if c == b'/' {
                        skipping = false;
                    } else if c == b';' {
                        skipping = true;
                    }
                    if !skipping {
                        out.push(c);
                    }
                }
                out
            }
            Norm::Lower => p.to_ascii_lowercase(),
        }
    }
}

fn hex(c: u8) -> Option<u8> {
    (c as char).to_digit(16).map(|d| d as u8)
}

/// Every valid `%XX` decoded once.
pub fn decode_once(p: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(p.len());
    let mut i = 0;
    while i < p.len() {
        if p[i] == b'%' {
            if let (Some(h), Some(l)) = (
                p.get(i + 1).copied().and_then(hex),
                p.get(i + 2).copied().and_then(hex),
            ) {
                out.push(h << 4 | l);
                i += 3;
                continue;
            }
        }
        out.push(p[i]);
        i += 1;
    }
    out
}

/// Decoded until nothing changes (at most 8 rounds).
pub fn decode_all(p: &[u8]) -> Vec<u8> {
    let mut cur = p.to_vec();
    for _ in 0..8 {
        let next = decode_once(&cur);
        if next == cur {
            break;
        }
        cur = next;
    }
    cur
}

/// RFC 3986 §5.2.4 dot-segment removal, on bytes.
pub fn remove_dots(p: &[u8]) -> Vec<u8> {
    let mut input: &[u8] = p;
    let mut out: Vec<u8> = Vec::new();
    let pop = |out: &mut Vec<u8>| {
        let cut = out.iter().rposition(|&c| c == b'/').unwrap_or(0);
        out.truncate(cut);
    };
    while !input.is_empty() {
        if let Some(r) = input.strip_prefix(b"../") {
            input = r;
        } else if let Some(r) = input.strip_prefix(b"./") {
            input = r;
        } else if input.starts_with(b"/./") {
            input = &input[2..];
        } else if input == b"/." {
            input = b"/";
        } else if input.starts_with(b"/../") {
            input = &input[3..];
            pop(&mut out);
        } else if input == b"/.." {
            input = b"/";
            pop(&mut out);
        } else if input == b"." || input == b".." {
            input = b"";
        } else {
            let start = usize::from(input[0] == b'/');
            let end = input[start..]
                .iter()
                .position(|&c| c == b'/')
                .map_or(input.len(), |e| e + start);
            out.extend_from_slice(&input[..end]);
            input = &input[end..];
        }
    }
    out
}

#[test]
fn normalisers_do_what_back_ends_do() {
    assert_eq!(remove_dots(b"/a/b/c/./../../g"), b"/a/g");
    assert_eq!(remove_dots(b"/x/../cp/admin"), b"/cp/admin");
    assert_eq!(remove_dots(b"/.."), b"/");
    assert_eq!(Norm::DecodeAll.apply(b"/%252e%252e"), b"/..");
    assert_eq!(Norm::DecodeOnce.apply(b"/%252e"), b"/%2e");
    assert_eq!(
        Norm::StripParams.apply(b"/cp;x/admin;y=1/z"),
        b"/cp/admin/z"
    );
    assert_eq!(Norm::Backslash.apply(b"/cp\\admin"), b"/cp/admin");
    assert_eq!(Norm::MergeSlashes.apply(b"//cp//admin"), b"/cp/admin");
}
