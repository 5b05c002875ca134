"""The appliance's core: speech, models, jobs, history, auth.

No Quart, no web, no system imports.
"""
