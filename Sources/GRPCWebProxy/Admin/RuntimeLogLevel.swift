import Logging
import Synchronization

/// The process's log level, which the admin port's `/logging?level=` changes at run time, as
/// Envoy's does. Loggers copy their handler when made, so the handler reads the level from here
/// on every message rather than keeping its own.
public enum RuntimeLogLevel {
  private static let storage = Atomic<Int>(Self.index(.info))
  private static let levels = Logger.Level.allCases

  public static var current: Logger.Level {
    get { Self.levels[Self.storage.load(ordering: .relaxed)] }
    set { Self.storage.store(Self.index(newValue), ordering: .relaxed) }
  }

  private static func index(_ level: Logger.Level) -> Int {
    Logger.Level.allCases.firstIndex(of: level) ?? 2
  }

  /// Envoy's level names (`warn`, `err`, `off` too) and swift-log's.
  public static func parse(_ name: String) -> Logger.Level? {
    switch name.lowercased() {
    case "trace": return .trace
    case "debug": return .debug
    case "info": return .info
    case "notice": return .notice
    case "warning", "warn": return .warning
    case "error", "err": return .error
    case "critical", "off": return .critical
    default: return nil
    }
  }
}

/// A stream handler whose level is the process's (RuntimeLogLevel). Setting a logger's level
/// changes nothing: the level is the admin port's to change.
public struct AdjustableLogHandler: LogHandler {
  private var inner: StreamLogHandler

  public init(_ inner: StreamLogHandler) {
    self.inner = inner
  }

  public var logLevel: Logger.Level {
    get { RuntimeLogLevel.current }
    set {}
  }

  public var metadata: Logger.Metadata {
    get { self.inner.metadata }
    set { self.inner.metadata = newValue }
  }

  public var metadataProvider: Logger.MetadataProvider? {
    get { self.inner.metadataProvider }
    set { self.inner.metadataProvider = newValue }
  }

  public subscript(metadataKey key: String) -> Logger.Metadata.Value? {
    get { self.inner[metadataKey: key] }
    set { self.inner[metadataKey: key] = newValue }
  }

  public func log(event: LogEvent) {
    self.inner.log(event: event)
  }
}
