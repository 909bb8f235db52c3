"""The finance web dashboard at ``/dashboard``: server-rendered pages (Jinja2), signed in with a
finance or admin API key into a session cookie. Every asset ships in the package."""
