"""Rollback pins: which releases of each model this device may run.

A signature says who approved a bundle, not that it is the release approved *now*: any older bundle signed by the
same key verifies too. A pins file (JSON) closes that gap, per model name (the manifest's ``name``)::

    {
      "pins": {
        "inspection-student": {"not_before": "2026-11-01T00:00:00+00:00"},
        "digits-student": {"allow": ["<sha256 of manifest.json>", "..."]}
      },
      "unpinned": "refuse"
    }

- ``not_before``: refuse a bundle whose manifest ``created`` is earlier (an older release). The date is part of
  the signed manifest, so this rule needs a trust set: without a signature anyone could rewrite it.
- ``allow``: run only bundles whose manifest has one of these sha256 digests (the manifest lists every file's
  digest, so this names the exact bytes approved; it holds without a signature too).
- ``unpinned``: ``refuse`` (default) or ``allow`` a bundle whose name has no pin.

Where from: ``--pins FILE``, else ``$EDGERUN_PINS``, else ``/etc/edgerun/pins.json`` if it exists; an empty value
is an error, as with trust. ``edgerun pin BUNDLE`` adds a bundle to the file.
"""

import json
import os
import re
from calendar import timegm
from datetime import datetime

from edgerun.errors import BundleError
from edgerun.files import write_atomically

PINS_ENV = "EDGERUN_PINS"
DEFAULT_PINS_FILE = "/etc/edgerun/pins.json"
RULES = ("not_before", "allow")

_ISO = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})(?:[T ](\d{2}):(\d{2})(?::(\d{2})(?:\.\d+)?)?)?"
    r"(Z|[+-]\d{2}:?\d{2})?$"
)


class PinError(BundleError):
    """A bundle refused by a pin, or a pins file that cannot be used."""


def parse_time(text, where):
    """Seconds since the epoch (UTC) of an ISO 8601 date or time ('2026-11-01', '2026-11-01T08:00:00+01:00');
    a time without an offset is UTC. Python 3.6 has no datetime.fromisoformat."""
    match = _ISO.match(str(text).strip())
    if not match:
        raise PinError(
            "%s: '%s' is not an ISO 8601 date or time (e.g. 2026-11-01 or 2026-11-01T08:00:00+00:00)" % (where, text)
        )
    year, month, day, hour, minute, second = (int(g or 0) for g in match.groups()[:6])
    try:
        seconds = timegm(datetime(year, month, day, hour, minute, second).timetuple())
    except ValueError as exc:
        raise PinError("%s: '%s' is not a valid date or time (%s)" % (where, text, exc)) from exc
    offset = match.group(7)
    if offset and offset != "Z":
        sign = -1 if offset[0] == "-" else 1
        digits = offset[1:].replace(":", "")
        seconds -= sign * (int(digits[:2]) * 3600 + int(digits[2:]) * 60)
    return seconds


def resolve_pins(explicit=None, environ=None, default_file=None):
    """The pins file: --pins, else $EDGERUN_PINS, else the device's pins file if it exists; None: no pins."""
    from edgerun.settings import Setting, resolve_setting

    setting = Setting(
        flag="--pins",
        env_name=PINS_ENV,
        exists=os.path.exists,
        error=PinError,
        what="a pins file",
        default=DEFAULT_PINS_FILE if default_file is None else default_file,
        off="the pins",
    )
    return resolve_setting(explicit, setting, environ)


def load_pins(path):
    """The pins file, checked: every rule known, every digest 64 hex characters, every date parseable."""
    try:
        with open(path) as fh:
            data = json.load(fh)
    except (OSError, IOError) as exc:
        raise PinError("pins file '%s' cannot be read (%s)" % (path, exc)) from exc
    except ValueError as exc:
        raise PinError(
            "pins file '%s' is not valid JSON (%s): fix it, or write it with `edgerun pin`" % (path, exc)
        ) from exc
    if not isinstance(data, dict) or not isinstance(data.get("pins"), dict):
        raise PinError("pins file '%s' must be a JSON object with a 'pins' object (model name -> rules)" % path)
    unknown = sorted(set(data) - {"pins", "unpinned"})
    if unknown:
        raise PinError("pins file '%s': unknown key(s) %s (known: pins, unpinned)" % (path, ", ".join(unknown)))
    if data.get("unpinned", "refuse") not in ("refuse", "allow"):
        raise PinError("pins file '%s': 'unpinned' is '%s'; use 'refuse' or 'allow'" % (path, data["unpinned"]))
    for name, rules in data["pins"].items():
        where = "pins file '%s', pin '%s'" % (path, name)
        if not isinstance(rules, dict) or not rules:
            raise PinError("%s: a pin is an object with %s" % (where, " and/or ".join(RULES)))
        extra = sorted(set(rules) - set(RULES))
        if extra:
            raise PinError("%s: unknown rule(s) %s (known: %s)" % (where, ", ".join(extra), ", ".join(RULES)))
        if "not_before" in rules:
            parse_time(rules["not_before"], where + " not_before")
        if "allow" in rules:
            allow = rules["allow"]
            if not isinstance(allow, list) or not all(
                isinstance(d, str) and re.match(r"^[0-9a-f]{64}$", d) for d in allow
            ):
                raise PinError(
                    "%s: 'allow' must be a list of manifest sha256 digests (64 lowercase hex "
                    "characters; `edgerun verify` prints a bundle's)" % where
                )
    return data


def check_pins(manifest, manifest_sha256, pins_path, signed, bundle_path):
    """Refuse a bundle the pins do not allow, naming the pin and the rule; returns a line saying which rule
    admitted it."""
    data = load_pins(pins_path)
    name = manifest.data["name"]
    what = "bundle '%s' (model '%s', created %s, manifest sha256 %s)" % (
        bundle_path,
        name,
        manifest.data.get("created", "?"),
        manifest_sha256[:16],
    )
    rules = data["pins"].get(name)
    if rules is None:
        if data.get("unpinned", "refuse") == "allow":
            return "model '%s' has no pin in %s (unpinned: allow)" % (name, pins_path)
        raise PinError(
            "%s is refused: pins file '%s' has no pin for model '%s' and refuses unpinned models (pinned: "
            "%s); add it with `edgerun pin`" % (what, pins_path, name, ", ".join(sorted(data["pins"])) or "none")
        )
    passed = []
    if "allow" in rules:
        if manifest_sha256 not in rules["allow"]:
            raise PinError(
                "%s is refused by pin '%s' in '%s': rule 'allow': its manifest is not one of the %d "
                "approved (an older or unapproved release)" % (what, name, pins_path, len(rules["allow"]))
            )
        passed.append("allow")
    if "not_before" in rules:
        if not signed:
            raise PinError(
                "pin '%s' in '%s' has rule 'not_before', which needs a trust set: the created date is only "
                "as good as the signature over it (configure --trust, or pin with 'allow')" % (name, pins_path)
            )
        created = manifest.data.get("created")
        if created is None:
            raise PinError(
                "%s is refused by pin '%s' in '%s': rule 'not_before': the manifest has no 'created' "
                "date" % (what, name, pins_path)
            )
        if parse_time(created, "manifest 'created'") < parse_time(rules["not_before"], "not_before"):
            raise PinError(
                "%s is refused by pin '%s' in '%s': rule 'not_before': created before %s (an older "
                "release: a rollback)" % (what, name, pins_path, rules["not_before"])
            )
        passed.append("not_before %s" % rules["not_before"])
    return "pin '%s' (%s) in %s" % (name, ", ".join(passed), pins_path)


def add_pin(pins_path, manifest, manifest_sha256, rule):
    """Add a bundle to the pins file (created if missing): ``allow`` appends its manifest digest to its model's
    allow list, ``not_before`` sets the model's floor to its created date. Written atomically."""
    data = load_pins(pins_path) if os.path.exists(pins_path) else {"pins": {}, "unpinned": "refuse"}
    name = manifest.data["name"]
    rules = data["pins"].setdefault(name, {})
    if rule == "allow":
        allow = rules.setdefault("allow", [])
        if manifest_sha256 not in allow:
            allow.append(manifest_sha256)
    elif rule == "not_before":
        if not manifest.data.get("created"):
            raise PinError("the bundle's manifest has no 'created' date to pin")
        rules["not_before"] = manifest.data["created"]
    else:
        raise PinError("unknown rule '%s' (known: %s)" % (rule, ", ".join(RULES)))
    parent = os.path.dirname(os.path.abspath(pins_path))
    if not os.path.isdir(parent):
        raise PinError(
            "the pins file's folder '%s' does not exist: create it (as root for %s)"
            % (parent, os.path.dirname(DEFAULT_PINS_FILE))
        )
    write_atomically(pins_path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode("utf-8"))
    return data
