"""Deciding who a token is: verifying it (:mod:`.tokens`, :mod:`.jwks`), asking the auth
service (:mod:`.introspection`, :mod:`.provider`), and the policy between the two
(:mod:`.policy`, :mod:`.authenticator`)."""
