package org.leukfhir.hapi;

import ca.uhn.fhir.context.FhirContext;
import ca.uhn.fhir.context.support.IValidationSupport;
import ca.uhn.fhir.interceptor.api.IInterceptorService;
import ca.uhn.fhir.jpa.api.config.JpaStorageSettings;
import ca.uhn.fhir.jpa.api.dao.IFhirSystemDao;
import ca.uhn.fhir.jpa.interceptor.CascadingDeleteInterceptor;
import ca.uhn.fhir.jpa.provider.JpaCapabilityStatementProvider;
import ca.uhn.fhir.jpa.provider.JpaSystemProvider;
import ca.uhn.fhir.jpa.search.DatabaseBackedPagingProvider;
import ca.uhn.fhir.rest.api.EncodingEnum;
import ca.uhn.fhir.rest.server.RestfulServer;
import ca.uhn.fhir.rest.server.interceptor.RequestValidatingInterceptor;
import ca.uhn.fhir.rest.server.provider.ResourceProviderFactory;
import ca.uhn.fhir.rest.server.util.ISearchParamRegistry;
import ca.uhn.fhir.validation.IInstanceValidatorModule;
import ca.uhn.fhir.validation.ResultSeverityEnum;
import org.eclipse.jetty.ee10.servlet.ServletContextHandler;
import org.eclipse.jetty.ee10.servlet.ServletHolder;
import org.eclipse.jetty.server.Server;
import org.eclipse.jetty.server.ServerConnector;
import org.eclipse.jetty.util.thread.QueuedThreadPool;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;
import org.springframework.context.annotation.AnnotationConfigApplicationContext;

/**
 * leuk-fhir's HAPI FHIR JPA test server: FHIR R4 at {@code http://HOST:PORT/fhir}, in-memory H2,
 * request validation against the base R4 specification.
 *
 * <p>Usage: {@code java -cp ... org.leukfhir.hapi.HapiTestServer [--host 127.0.0.1] [--port 8080]}.
 * Exits with status 1 when start-up fails; stops cleanly on SIGTERM.
 */
public final class HapiTestServer {

  private static final Logger LOG = LoggerFactory.getLogger(HapiTestServer.class);

  private HapiTestServer() {}

  public static void main(String[] args) {
    String host = "127.0.0.1";
    int port = 8080;
    for (int i = 0; i < args.length; i++) {
      switch (args[i]) {
        case "--host" -> host = args[++i];
        case "--port" -> port = Integer.parseInt(args[++i]);
        default -> {
          System.err.println("usage: HapiTestServer [--host HOST] [--port PORT]");
          System.exit(2);
        }
      }
    }
    long started = System.nanoTime();
    try {
      start(host, port);
    } catch (Throwable error) {
      LOG.error("HAPI FHIR test server failed to start", error);
      System.exit(1);
    }
    LOG.info(
        "HAPI FHIR test server ready at http://{}:{}/fhir after {} s",
        host,
        port,
        String.format("%.1f", (System.nanoTime() - started) / 1e9));
  }

  /** Builds the Spring context and the REST server, then starts Jetty; returns once listening. */
  static Server start(String host, int port) throws Exception {
    AnnotationConfigApplicationContext spring =
        new AnnotationConfigApplicationContext(HapiJpaServerConfig.class);
    RestfulServer fhirServer = restfulServer(spring);

    QueuedThreadPool threads = new QueuedThreadPool(32, 4);
    threads.setName("hapi-http");
    Server jetty = new Server(threads);
    ServerConnector connector = new ServerConnector(jetty);
    connector.setHost(host);
    connector.setPort(port);
    jetty.addConnector(connector);

    ServletContextHandler context = new ServletContextHandler();
    context.setContextPath("/");
    ServletHolder holder = new ServletHolder("fhir", fhirServer);
    holder.setInitOrder(1);
    context.addServlet(holder, "/fhir/*");
    jetty.setHandler(context);
    jetty.setStopAtShutdown(false);

    Runtime.getRuntime()
        .addShutdownHook(
            new Thread(
                () -> {
                  LOG.info("Stopping HAPI FHIR test server");
                  try {
                    jetty.stop();
                  } catch (Exception error) {
                    LOG.warn("Jetty did not stop cleanly", error);
                  }
                  spring.close();
                },
                "hapi-shutdown"));
    jetty.start();
    return jetty;
  }

  /** The HAPI REST layer over the JPA DAOs: resource types, transactions, paging, validation. */
  private static RestfulServer restfulServer(AnnotationConfigApplicationContext spring) {
    FhirContext fhirContext = spring.getBean(FhirContext.class);
    RestfulServer server = new RestfulServer(fhirContext);
    server.setInterceptorService(spring.getBean(IInterceptorService.class));
    server.setDefaultResponseEncoding(EncodingEnum.JSON);
    server.registerProviders(spring.getBean(ResourceProviderFactory.class).createProviders());
    server.registerProvider(spring.getBean(JpaSystemProvider.class));
    server.setPagingProvider(spring.getBean(DatabaseBackedPagingProvider.class));

    @SuppressWarnings("unchecked")
    IFhirSystemDao<?, ?> systemDao = spring.getBean(IFhirSystemDao.class);
    JpaCapabilityStatementProvider capabilities =
        new JpaCapabilityStatementProvider(
            server,
            systemDao,
            spring.getBean(JpaStorageSettings.class),
            spring.getBean(ISearchParamRegistry.class),
            spring.getBean(IValidationSupport.class));
    capabilities.setImplementationDescription("leuk-fhir HAPI FHIR JPA test server");
    server.setServerConformanceProvider(capabilities);

    server.registerInterceptor(requestValidation(spring));
    // DELETE ...?_cascade=delete also deletes the resources that reference the target, so test
    // clean-up can remove a whole report (DiagnosticReport, Observations, Provenance) at once.
    server.registerInterceptor(spring.getBean(CascadingDeleteInterceptor.class));
    return server;
  }

  /**
   * Rejects requests whose body breaks the base R4 specification (HTTP 422 with an
   * OperationOutcome). Terminology problems with LOINC and SNOMED CT codes only warn (UCUM is checked offline and stays strict); see
   * {@link OfflineTerminologyLeniency}, applied to the validator bean by {@link
   * ValidationCustomizer}.
   */
  private static RequestValidatingInterceptor requestValidation(
      AnnotationConfigApplicationContext spring) {
    RequestValidatingInterceptor interceptor = new RequestValidatingInterceptor();
    interceptor.addValidatorModule(spring.getBean(IInstanceValidatorModule.class));
    interceptor.setFailOnSeverity(ResultSeverityEnum.ERROR);
    interceptor.setAddResponseHeaderOnSeverity(null);
    // $validate reports its own result; the interceptor's copy would list every issue twice.
    interceptor.setAddValidationResultsToResponseOperationOutcome(false);
    return interceptor;
  }
}
