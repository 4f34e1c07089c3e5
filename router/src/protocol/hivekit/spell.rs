//! The keys of an object action spelled out (the client's field table) in the event
//! it is published as: `lab` as `label`, `loc`'s `lon` as `longitude`, unknown keys as
//! written.

use std::borrow::Cow;

use super::codec::{key, short_key};
use crate::protocol::json::{Member, Scratch};

/// `spelled!(key, short => long, ...)`: a table lookup as integer comparisons.
macro_rules! spelled {
    ($key:expr, $($short:literal => $long:literal),* $(,)?) => {{
        let k = short_key($key);
        $(
            if k == const { short_key($short) } {
                return Some($long);
            }
        )*
        None
    }};
}

/// An action key spelled out in published events (the client's field table); None:
/// not in it, kept as written.
fn field_name(short: &[u8]) -> Option<&'static [u8]> {
    spelled!(short,
        b"typ" => b"type",
        b"sty" => b"scopeType",
        b"sid" => b"scopeId",
        b"exe" => b"executeImmediately",
        b"act" => b"action",
        b"res" => b"result",
        b"cid" => b"correlationId",
        b"id" => b"id",
        b"rea" => b"realm",
        b"dat" => b"data",
        b"loc" => b"location",
        b"err" => b"error",
        b"lab" => b"label",
        b"atr" => b"attribute",
        b"uty" => b"updateType",
        b"ins" => b"instruction",
        b"cst" => b"connectionStatus",
        b"sha" => b"shape",
        b"fie" => b"field",
        b"val" => b"value",
        b"sta" => b"start",
        b"end" => b"end",
        b"lvl" => b"level",
        b"eve" => b"event",
        b"idp" => b"idPattern",
        b"erc" => b"errorCode",
        b"int" => b"interval",
        b"tim" => b"time",
        b"r" => b"radius",
        b"sts" => b"status",
        b"stp" => b"steps",
        b"dsc" => b"description",
        b"tid" => b"targetId",
        b"tds" => b"taskIds",
    )
}

/// A `loc` key spelled out in published events.
fn location_name(short: &[u8]) -> Option<&'static [u8]> {
    spelled!(short,
        b"gcs" => b"coordinateSystem",
        b"lon" => b"longitude",
        b"lat" => b"latitude",
        b"acc" => b"accuracy",
        b"spe" => b"speed",
        b"hea" => b"heading",
        b"alt" => b"altitude",
        b"alc" => b"altitudeAccuracy",
        b"tim" => b"time",
    )
}

/// How a member's key is written in an event.
struct Name<'t> {
    /// The name once spelled out (or unescaped).
    name: Cow<'t, [u8]>,
    /// Written as the device wrote it (escapes and all): an unknown key with escapes.
    as_written: bool,
}

/// A member's name spelled out by `spell` (unknown keys as written).
fn name_of<'t>(text: &'t [u8], m: &Member, spell: fn(&[u8]) -> Option<&'static [u8]>) -> Name<'t> {
    let k = key(text, m);
    match spell(&k) {
        Some(long) => Name {
            name: Cow::Borrowed(long),
            as_written: false,
        },
        None => Name {
            name: k,
            as_written: m.key_escaped,
        },
    }
}

/// Does one of `later` end up with the name `n`? (Spelled again rather than collected:
/// objects here have a handful of members, and collecting the names cost more.)
fn named_again(
    text: &[u8],
    later: &[Member],
    n: &Name,
    spell: fn(&[u8]) -> Option<&'static [u8]>,
) -> bool {
    later.iter().any(|m| name_of(text, m, spell).name == n.name)
}

/// `"name":` for a member.
fn push_name(out: &mut Vec<u8>, text: &[u8], m: &Member, n: &Name) {
    if n.as_written {
        out.extend_from_slice(&text[m.key.clone()]);
    } else {
        out.push(b'"');
        out.extend_from_slice(&n.name);
        out.push(b'"');
    }
    out.push(b':');
}

/// Members of an action the router writes itself (spelled out), the device's identity
/// included: the rest of an object action is carried into its event. (A device's own
/// `device`, `account` or `service` would stand beside the real ones as a duplicate key,
/// and a consumer that keeps the first of two would read the spoofed one.)
fn is_control(name: &[u8]) -> bool {
    matches!(
        name,
        b"type"
            | b"action"
            | b"correlationId"
            | b"id"
            | b"realm"
            | b"device"
            | b"account"
            | b"service"
    )
}

/// An object with its keys spelled out by `spell`, the values as written. Where two
/// members end up with the same name, the last is written.
fn push_spelled_object(
    out: &mut Vec<u8>,
    obj: &[u8],
    members: &[Member],
    spell: fn(&[u8]) -> Option<&'static [u8]>,
) {
    out.push(b'{');
    let mut first = true;
    for (i, m) in members.iter().enumerate() {
        let n = name_of(obj, m, spell);
        if named_again(obj, &members[i + 1..], &n, spell) {
            continue;
        }
        if !first {
            out.push(b',');
        }
        first = false;
        push_name(out, obj, m, &n);
        out.extend_from_slice(&obj[m.value.clone()]);
    }
    out.push(b'}');
}

/// An object action's members after what the router wrote itself (`,"name":value` each),
/// minus the ones it read; the location object spelled out too. Where two members end
/// up with the same name, the last counts. `scratch` parses the location object.
pub(super) fn push_members(
    ev: &mut Vec<u8>,
    text: &[u8],
    members: &[Member],
    scratch: &mut Scratch,
) {
    for (i, m) in members.iter().enumerate() {
        // The router's own members, cheaply first (as written, unescaped: the usual case).
        if !m.key_escaped
            && matches!(
                &text[m.key.start + 1..m.key.end - 1],
                b"typ" | b"act" | b"id" | b"cid" | b"rea"
            )
        {
            continue;
        }
        let n = name_of(text, m, field_name);
        if is_control(&n.name) || named_again(text, &members[i + 1..], &n, field_name) {
            continue;
        }
        ev.push(b',');
        push_name(ev, text, m, &n);
        let value = &text[m.value.clone()];
        if &*n.name == b"location" && scratch.parse_object(value).is_ok() {
            push_spelled_object(ev, value, &scratch.members, location_name);
        } else {
            ev.extend_from_slice(value);
        }
    }
}
