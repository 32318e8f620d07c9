"""HTTP layer shared by every domain: dependencies, pagination and the `/api/v1` router."""
