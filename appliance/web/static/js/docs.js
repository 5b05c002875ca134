// Starts Swagger UI on the appliance's own OpenAPI schema (kept out of the page: strict CSP).
window.ui = SwaggerUIBundle({ url: "/openapi.json", dom_id: "#swagger-ui", deepLinking: true });
