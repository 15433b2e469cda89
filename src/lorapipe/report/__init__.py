"""The reports people read: one HTML page per stage and one for the whole run, rendered from
what the stages wrote (``sections``) with Jinja2 templates (``page``, ``templates/``)."""
