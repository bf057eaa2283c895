//! Values that are SDK templates (`{var.name}`, `{header.x}`, …): rendered per request into
//! a buffer each request thread reuses, or once when they have no expression.

use std::cell::RefCell;

use outpost_plugin_sdk::template::Template;
use outpost_plugin_sdk::{Context, Head};

/// A configured value that may hold template expressions.
#[derive(Debug)]
pub(crate) struct Text {
    template: Template,
    /// The text, when the template has no expression.
    constant: Option<String>,
}

thread_local! {
    static BUFFER: RefCell<String> = const { RefCell::new(String::new()) };
}

impl Text {
    /// Parses `raw`; the error names the field.
    pub(crate) fn parse(field: &str, raw: &str) -> Result<Self, String> {
        let template = Template::parse(raw).map_err(|e| format!("{field}: {e}"))?;
        // Only `{{` and `}}` escapes are left in a constant template.
        let constant = template
            .is_constant()
            .then(|| raw.replace("{{", "{").replace("}}", "}"));
        Ok(Text { template, constant })
    }

    /// Renders the value for this request and hands it to `f` with the head and context.
    pub(crate) fn with<R>(
        &self,
        head: &mut Head<'_, '_>,
        ctx: &mut Context<'_, '_>,
        f: impl FnOnce(&mut Head<'_, '_>, &mut Context<'_, '_>, &str) -> R,
    ) -> R {
        if let Some(c) = &self.constant {
            return f(head, ctx, c);
        }
        BUFFER.with(|cell| {
            // A hook never re-enters another: the buffer is free unless `f` renders again.
            let Ok(mut buf) = cell.try_borrow_mut() else {
                let mut own = String::new();
                self.template.render(head, ctx, &mut own);
                return f(head, ctx, &own);
            };
            buf.clear();
            self.template.render(head, ctx, &mut buf);
            f(head, ctx, &buf)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constants_are_unescaped_once() {
        let t = Text::parse("value", "a {{b}} c").unwrap();
        assert_eq!(t.constant.as_deref(), Some("a {b} c"));
        let t = Text::parse("value", "{{{{x}}}}").unwrap();
        assert_eq!(t.constant.as_deref(), Some("{{x}}"));
        assert!(Text::parse("value", "{var.x}")
            .unwrap()
            .constant
            .as_deref()
            .is_none());
        let e = Text::parse("value", "{nope}").unwrap_err();
        assert!(e.starts_with("value: unknown expression '{nope}'"), "{e}");
    }
}
