"""Job and spec objects: one object carries what a long-running function needs (the camera loop, the bench, an
engine build, a service unit) instead of a long argument list. Python 3.6 has no dataclasses, so a ``Spec`` lists its
fields once, in ``FIELDS`` (name -> default, ``REQUIRED`` for none); a misspelt or missing field is a TypeError at
construction, never a silent default."""

REQUIRED = object()


class Spec(object):
    """Keyword-only construction over ``FIELDS``; attributes afterwards."""

    FIELDS = {}

    def __init__(self, **fields):
        unknown = sorted(set(fields) - set(self.FIELDS))
        if unknown:
            raise TypeError(
                "%s has no field %s (fields: %s)" % (type(self).__name__, ", ".join(unknown), ", ".join(self.FIELDS))
            )
        for name, default in self.FIELDS.items():
            value = fields.get(name, default)
            if value is REQUIRED:
                raise TypeError("%s needs %s" % (type(self).__name__, name))
            setattr(self, name, value)

    def replace(self, **changes):
        """A copy with ``changes``."""
        values = dict((name, getattr(self, name)) for name in self.FIELDS)
        values.update(changes)
        return type(self)(**values)

    def __repr__(self):
        return "%s(%s)" % (type(self).__name__, ", ".join("%s=%r" % (k, getattr(self, k)) for k in self.FIELDS))
