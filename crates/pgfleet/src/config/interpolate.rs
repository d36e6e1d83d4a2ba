//! OmegaConf-style interpolation of configuration strings.
//!
//! * `${oc.env:VAR}` — the environment variable `VAR`; an error if unset.
//! * `${oc.env:VAR,default}` — `VAR`, or `default` if unset. The default may
//!   be empty, quoted (`'x'`, `"x"`), and may itself contain `${...}`.
//! * `${VAR}` — the environment variable `VAR` (unlike OmegaConf, where this
//!   would refer to another configuration key: pgfleet's configuration has
//!   no node references, and reading the environment is what users mean).
//! * `\${` — a literal `${`.

/// Replaces every interpolation in `input`, reading variables through `env`.
///
/// # Errors
/// A message for an unterminated `${`, an empty name, an unknown resolver, or
/// an unset variable without default. The message names variables and
/// resolvers but never repeats the input (it may hold a default password);
/// the caller shows the value, masked where it is secret.
pub(crate) fn interpolate(
    input: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<String, String> {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(pos) = rest.find(['$', '\\']) {
        out.push_str(&rest[..pos]);
        let tail = &rest[pos..];
        if let Some(after) = tail.strip_prefix("\\${") {
            out.push_str("${");
            rest = after;
        } else if let Some(after) = tail.strip_prefix("${") {
            let end = closing_brace(after).ok_or_else(|| "unterminated `${`".to_owned())?;
            out.push_str(&resolve(&after[..end], env)?);
            rest = &after[end + 1..];
        } else {
            out.push_str(&tail[..1]);
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// The index of the `}` closing an interpolation whose body starts at the
/// beginning of `s`, accounting for nested `${...}`.
fn closing_brace(s: &str) -> Option<usize> {
    let bytes = s.as_bytes();
    let mut depth = 0usize;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' if s[i..].starts_with("\\${") => i += 2,
            b'$' if bytes.get(i + 1) == Some(&b'{') => {
                depth += 1;
                i += 1;
            }
            b'}' if depth == 0 => return Some(i),
            b'}' => depth -= 1,
            _ => {}
        }
        i += 1;
    }
    None
}

/// The comma separating the variable from its default, outside nested
/// interpolations.
fn top_level_comma(s: &str) -> Option<usize> {
    let mut depth = 0usize;
    let bytes = s.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b'$' if bytes.get(i + 1) == Some(&b'{') => depth += 1,
            b'}' if depth > 0 => depth -= 1,
            b',' if depth == 0 => return Some(i),
            _ => {}
        }
    }
    None
}

fn resolve(body: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let (name, default) = if let Some(args) = body.strip_prefix("oc.env:") {
        match top_level_comma(args) {
            Some(i) => (args[..i].trim(), Some(args[i + 1..].trim())),
            None => (args.trim(), None),
        }
    } else if let Some((resolver, _)) = body.split_once(':') {
        return Err(format!("unknown resolver `{resolver}` (supported: oc.env)"));
    } else {
        (body.trim(), None)
    };
    if name.is_empty() {
        return Err("empty variable name in `${...}`".to_owned());
    }
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        || name.starts_with(|c: char| c.is_ascii_digit())
    {
        return Err(format!(
            "`{name}` is not an environment variable name (node references are not supported; use ${{oc.env:VAR}})"
        ));
    }
    match (env(name), default) {
        (Some(value), _) => Ok(value),
        (None, Some(default)) => interpolate(unquote(default), env),
        (None, None) => Err(format!(
            "environment variable {name} is not set and has no default (use ${{oc.env:{name},default}})"
        )),
    }
}

fn unquote(s: &str) -> &str {
    for q in ['\'', '"'] {
        if let Some(inner) = s.strip_prefix(q).and_then(|s| s.strip_suffix(q)) {
            return inner;
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "HOST" => Some("db.internal".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    fn i(s: &str) -> Result<String, String> {
        interpolate(s, &env)
    }

    #[test]
    fn oc_env_with_and_without_default() {
        assert_eq!(i("${oc.env:HOST,localhost}").unwrap(), "db.internal");
        assert_eq!(i("${oc.env:NOPE,localhost}").unwrap(), "localhost");
        assert_eq!(i("${oc.env:NOPE,}").unwrap(), "");
        assert_eq!(i("${oc.env:NOPE,'a,b'}").unwrap(), "a,b");
        assert_eq!(i("${oc.env:HOST}").unwrap(), "db.internal");
        assert_eq!(i("${oc.env:EMPTY,x}").unwrap(), "");
        assert_eq!(
            i("postgres://${HOST}:${oc.env:PORT,5432}/x").unwrap(),
            "postgres://db.internal:5432/x"
        );
    }

    #[test]
    fn nested_defaults_and_escapes() {
        assert_eq!(i("${oc.env:NOPE,${oc.env:HOST,x}}").unwrap(), "db.internal");
        assert_eq!(i("${oc.env:NOPE,${oc.env:NOPE2,deep}}").unwrap(), "deep");
        assert_eq!(i(r"\${HOST}").unwrap(), "${HOST}");
        assert_eq!(i(r"cost: $5 \ ok").unwrap(), r"cost: $5 \ ok");
    }

    #[test]
    fn errors_say_what_is_wrong() {
        assert!(i("${oc.env:HOST").unwrap_err().contains("unterminated"));
        assert!(i("${}").unwrap_err().contains("empty variable name"));
        assert!(i("${oc.env:}").unwrap_err().contains("empty variable name"));
        assert!(i("${foo:bar}")
            .unwrap_err()
            .contains("unknown resolver `foo`"));
        assert!(i("${NOPE}").unwrap_err().contains("NOPE is not set"));
        assert!(i("${a.b}")
            .unwrap_err()
            .contains("node references are not supported"));
    }

    proptest! {
        #[test]
        fn text_without_interpolations_passes_through(s in "\\PC{0,40}") {
            prop_assume!(!s.contains("${"));
            prop_assert_eq!(i(&s).unwrap(), s);
        }

        #[test]
        fn dollars_and_backslashes_alone_pass_through(
            s in "[$\\\\{}a ]{0,40}".prop_map(|s| s.replace("${", "$a{"))
        ) {
            prop_assert_eq!(i(&s).unwrap(), s);
        }

        #[test]
        fn escapes_mix_with_interpolations(a in "[a-z ]{0,8}", b in "[a-z ]{0,8}") {
            let input = format!("{a}\\${{HOST}}{b}${{HOST}}\\${{oc.env:NOPE,x}}");
            prop_assert_eq!(
                i(&input).unwrap(),
                format!("{a}${{HOST}}{b}db.internal${{oc.env:NOPE,x}}")
            );
        }

        #[test]
        fn errors_never_repeat_the_default(secret in "[A-Za-z0-9]{6,12}") {
            for input in [
                format!("${{oc.env:NOPE,{secret}"),
                format!("${{oc.env:,{secret}}}"),
                format!("${{foo:NOPE,{secret}}}"),
                format!("${{oc.env:NOPE,${{UNSET_TOO}}{secret}}}"),
            ] {
                let err = i(&input).unwrap_err();
                prop_assert!(!err.contains(&secret), "{}", err);
            }
        }

        #[test]
        fn escaped_text_comes_out_literal(s in "[a-zA-Z0-9 ._]{0,20}") {
            let input = format!("\\${{{s}}}");
            prop_assert_eq!(i(&input).unwrap(), format!("${{{s}}}"));
        }

        #[test]
        fn defaults_nest_to_any_depth(depth in 1usize..6, leaf in "[a-z0-9]{1,8}") {
            let mut expr = leaf.clone();
            for n in 0..depth {
                expr = format!("${{oc.env:UNSET_{n},{expr}}}");
            }
            prop_assert_eq!(i(&expr).unwrap(), leaf);
        }

        #[test]
        fn never_panics(s in "\\PC{0,40}") {
            let _ = i(&s);
        }
    }
}
