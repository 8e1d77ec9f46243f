r"""postgres_changes filters: the ``filter`` text, typed matching and the fan-out index.

Three pure steps (no I/O, no SQL) of PROTOCOL.md 4.2-4.4, one module each:

* ``grammar.parse_filter`` turns a binding's ``filter`` string into ``Condition`` values, with
  the reference's splitting, unquoting and error messages (4.2).
* ``predicates.compile_conditions`` checks conditions against the table's column types, as
  the reference's ``subscription_check_filters`` trigger does at subscribe time (4.3), and
  returns a ``Matcher`` that evaluates them on typed records; values are cast and compared
  by ``pgtypes.casting``.
* ``index.BindingIndex`` holds one table's bindings and narrows a change to the bindings
  whose first plain ``eq`` condition can hold, so fan-out does not run every matcher (4.4
  step 4).

Errors are ``FilterError`` (``core.errors``). Those the reference raises before touching the
database have no ``sqlstate`` and a complete message; those its database raises carry the
SQLSTATE, and ``postgres_error`` renders them the way the reference quotes them after
"Exception: ".
"""
