"""Customer mails: rendering (``render``) from Jinja2 templates in ``templates/``."""
