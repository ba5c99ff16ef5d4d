"""Click commands of the ``convcrf`` CLI; each module parses, calls the library and reports."""
