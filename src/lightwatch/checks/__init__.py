"""The diagnoses: what each check observes, the state it keeps, when it is judged and what alert it raises.

Each check is a small class with no Lightning dependency; the callbacks in :mod:`lightwatch.callbacks` feed
them and write what they report. Submodules are imported explicitly by the callbacks that use them.
"""
