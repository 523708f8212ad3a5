"""Third-party adapters: the only modules that touch another library's private names, one module per surface.

Each adapter checks the installed version of the library it reaches into and fails with one clear line on a
version it was not written for; everything else in chase_timm goes through these modules.
"""
